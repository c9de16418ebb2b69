//! Random bytes from the kernel (`getrandom`): unpredictable names and cookies.

/// `N` random bytes, or the error (a short read counts as one).
pub fn bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: `out` is a live, writable buffer of the length passed; getrandom writes at most
    // that many bytes into it.
    let got = unsafe { libc::getrandom(out.as_mut_ptr().cast(), out.len(), 0) };
    if usize::try_from(got).ok() != Some(N) {
        return Err(std::io::Error::other("getrandom failed"));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    #[test]
    fn two_draws_differ() {
        assert_ne!(super::bytes::<16>().unwrap(), super::bytes::<16>().unwrap());
    }
}
