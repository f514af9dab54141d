//! Which CPU the measurements run on.

pub(super) fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// CPUs online (not this thread's affinity, which pinning narrows).
pub(super) fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

pub(super) fn bench_cpu() -> usize {
    // The last CPU: on a 2-CPU machine, CPU 1, leaving CPU 0 to the rest.
    online_cpus() - 1
}
