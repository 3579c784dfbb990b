//! Prompt wake-ups for the threads that move frames, and the compute thread that yields to
//! them.
//!
//! A frame that arrives while the CPU runs something else waits until the scheduler lets its
//! thread run. Linux (6.12 and later, EEVDF) lets a thread ask for a shorter time slice: it
//! then has an earlier deadline when it wakes and preempts a thread with a longer slice,
//! such as a node's compute thread or, where several nodes share the cores, another node's.
//! The thread's share of the CPU is unchanged (a quota still counts all of its time); only
//! how long a woken frame waits. Threads it starts (a compute thread, an engine's pool) get
//! the default slice back. Older kernels ignore the request for ordinary threads.
//!
//! The compute thread also runs at a lower priority ([`yield_to_frames`]), so the threads that
//! receive frames, answer pings and forward activations preempt a step on a device with little
//! CPU, or under a quota, instead of waiting for its time slice. A lower priority costs the
//! engine nothing when nothing else wants the CPU.

/// The slice asked for: the kernel's shortest (0.1 ms).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const SLICE_NS: u64 = 100_000;

/// Asks for short time slices on the calling thread (see the module). Returns whether the
/// kernel took the request; failure is harmless (the thread keeps the default slice).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn wake_promptly() -> bool {
    // SAFETY: plain system calls on the calling thread; `attr` lives across the call and
    // its size field tells the kernel how much of it to read.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        // The call sets the nice value too: keep the thread's own (-1 is also a valid value,
        // hence the errno check).
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        if nice == -1 && *libc::__errno_location() != 0 {
            return false;
        }
        let attr = libc::sched_attr {
            size: std::mem::size_of::<libc::sched_attr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            // Threads started from this one (compute, pools) keep the default slice.
            sched_flags: libc::SCHED_FLAG_RESET_ON_FORK as u64,
            sched_nice: nice,
            sched_priority: 0,
            sched_runtime: SLICE_NS,
            sched_deadline: 0,
            sched_period: 0,
        };
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        ) == 0
    }
}

/// Elsewhere threads keep the scheduler's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn wake_promptly() -> bool {
    false
}

/// The compute thread's nice value.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const COMPUTE_NICE: libc::c_int = 10;

/// Lowers the calling (compute) thread's priority to nice 10 (see the module); Linux keeps a
/// nice value per thread, so only this thread's changes. Returns whether it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn yield_to_frames() -> bool {
    // SAFETY: plain system calls on the calling thread, no memory passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, COMPUTE_NICE) == 0
    }
}

/// Elsewhere the thread keeps its priority.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn yield_to_frames() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn attr() -> libc::sched_attr {
        // SAFETY: an all-zero sched_attr is a valid value of plain integers.
        let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::sched_attr>() as u32;
        // SAFETY: `attr` is `size` bytes, the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut libc::sched_attr,
                size,
                0,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        attr
    }

    /// The request keeps the thread's nice value and, where the kernel supports it, sets
    /// the slice (read back with `sched_getattr`), which a thread it starts does not inherit.
    #[test]
    fn a_thread_keeps_its_nice_value_and_gets_the_short_slice() {
        std::thread::spawn(|| {
            // SAFETY: as in `wake_promptly`.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            // SAFETY: setpriority on the calling thread.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 3) }, 0);
            // Kernels with per-thread slices report the slice (the default here); older ones
            // report 0 for ordinary threads and ignore the request.
            let slices = attr().sched_runtime != 0;
            assert!(wake_promptly());
            // SAFETY: getpriority on the calling thread.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, 3);
            let own = attr();
            assert_eq!(own.sched_nice, 3);
            if slices {
                assert_eq!(own.sched_runtime, SLICE_NS, "slice after the request");
                let child = std::thread::spawn(attr).join().unwrap();
                assert_ne!(child.sched_runtime, SLICE_NS, "a started thread's slice");
                assert_eq!(child.sched_nice, 3);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_compute_thread_runs_at_nice_10_and_others_keep_theirs() {
        let nice = || {
            // SAFETY: as in `wake_promptly`.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        };
        let before = nice();
        let compute = std::thread::spawn(move || (yield_to_frames(), nice()))
            .join()
            .unwrap();
        assert_eq!(compute, (true, COMPUTE_NICE));
        assert_eq!(nice(), before);
    }
}
