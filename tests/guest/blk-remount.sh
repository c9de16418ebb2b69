# Guest test, second boot: the filesystem left by blk-data.sh is intact after a guest reboot
# (a new vhost-user front-end on the same daemon).
dev=/dev/vda
test -b "$dev"
mount -t ext4 $dev /mnt
want=$(cat /mnt/file.md5)
got=$(md5sum < /mnt/file | cut -d' ' -f1)
echo "remount want=$want got=$got"
[ "$want" = "$got" ]
umount /mnt
echo "guest-remount ok"
