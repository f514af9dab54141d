//! The process's open-file limit. Many systems start services with a soft
//! limit of 1024 and a far higher hard limit; every health probe, admin
//! connection and map needs a descriptor, so `lb` takes what it is allowed.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard)
/// as they are afterwards.
pub fn raise() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let (soft, hard) = super::raise().unwrap();
        assert_eq!(soft, hard);
    }
}
