/* Exercises libnovacron against a running novacrond: argv[1] = control socket,
 * argv[2] = a directory for the device's socket and image. Prints "C CLIENT OK" on success. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "novacron.h"

#define CHECK(cond, what) do { if (!(cond)) { \
    fprintf(stderr, "FAILED: %s (last error: %s / %s)\n", what, nc_last_error_kind(), nc_last_error()); \
    return 1; } } while (0)

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s CONTROL_SOCKET DIR\n", argv[0]); return 2; }
    nc_client *client = NULL;

    CHECK(nc_connect("/nonexistent/control.sock", &client) == NC_ERR_CONNECT, "connect to a missing socket fails");
    CHECK(strcmp(nc_last_error_kind(), "connect") == 0, "error kind is connect");
    CHECK(nc_connect(argv[1], &client) == NC_OK && client != NULL, "connect");

    char params[1024];
    snprintf(params, sizeof params,
             "{\"type\":\"blk\",\"id\":\"cdev\",\"socket\":\"%s/cdev.sock\",\"path\":\"%s/cdev.img\",\"size\":\"4M\"}",
             argv[2], argv[2]);
    char *added = NULL;
    CHECK(nc_device_add(client, params, &added) == NC_OK, "device add");
    CHECK(added != NULL && strstr(added, "\"cdev\"") != NULL, "add returns the device");
    nc_string_free(added);

    CHECK(nc_device_add(client, params, NULL) == NC_ERR_SERVER, "duplicate add is refused");
    CHECK(strcmp(nc_last_error_kind(), "exists") == 0, "duplicate kind is exists");
    CHECK(nc_device_add(client, "{not json", NULL) == NC_ERR_INVALID_ARGUMENT, "bad JSON is refused locally");
    CHECK(nc_device_add(client, NULL, NULL) == NC_ERR_SERVER, "add without params is refused by the daemon");
    CHECK(strcmp(nc_last_error_kind(), "invalid-params") == 0, "missing type is invalid-params");

    char *list = NULL;
    CHECK(nc_device_list(client, &list) == NC_OK, "device list");
    CHECK(strstr(list, "cdev") != NULL, "list names the device");
    nc_string_free(list);

    nc_blk_totals totals;
    memset(&totals, 0xff, sizeof totals);
    CHECK(nc_device_stats(client, "cdev", &totals) == NC_OK, "stats");
    CHECK(totals.reads == 0 && totals.writes == 0 && totals.in_flight == 0, "fresh device has zero counters");
    CHECK(nc_device_stats(client, "nope", &totals) == NC_ERR_SERVER, "stats of a missing device");
    CHECK(strcmp(nc_last_error_kind(), "not-found") == 0, "missing device is not-found");

    char *info = NULL;
    CHECK(nc_call(client, "daemon.info", NULL, &info) == NC_OK, "generic call");
    CHECK(strstr(info, "novacrond") != NULL, "info names the daemon");
    nc_string_free(info);

    CHECK(nc_device_remove(client, "cdev", false) == NC_OK, "remove");
    CHECK(nc_device_remove(client, "cdev", false) == NC_ERR_SERVER, "second remove fails");
    CHECK(nc_device_remove(NULL, "cdev", false) == NC_ERR_INVALID_ARGUMENT, "NULL client");

    nc_disconnect(client);
    nc_disconnect(NULL);
    nc_string_free(NULL);
    printf("C CLIENT OK\n");
    return 0;
}
