//! Keeping the heartbeat alive on a node under attack: real-time scheduling for
//! the agent's threads and locked memory. Both fail softly (a warning and normal
//! operation) where the process is not permitted.

use std::io;

/// Puts the calling thread under SCHED_RR at `priority`. `SCHED_RESET_ON_FORK`
/// makes child processes (the drain, resume and terminate hooks) start at normal
/// priority, since an operator's script must not run ahead of the node's real
/// work. It resets new threads too, so every thread that should run at `priority`
/// asks for it itself: [`runtime`] does so for each of its threads.
pub fn realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: sched_setscheduler reads `param` for the duration of the call only;
    // pid 0 is the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The agent's runtime: one worker (the agent is small; trace export needs a
/// multi-threaded runtime), every thread of it under SCHED_RR at `realtime` when
/// given and permitted (the caller has asked on its own thread first and knows
/// whether it is).
pub fn runtime(realtime_priority: Option<u8>) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = secbeat::process::runtime_builder(1);
    if let Some(priority) = realtime_priority {
        builder.on_thread_start(move || {
            // Refused only where the caller's own request was refused and warned about.
            let _ = realtime(priority);
        });
    }
    builder.build()
}

/// Locks the process's memory in RAM as it is touched (`MCL_ONFAULT`): what the
/// agent uses can never be paged out, while address space it merely reserves
/// (thread stacks, allocator arenas) is not made resident. Locking everything
/// mapped made each agent hold 77 MB; on fault it holds what it uses.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: mlockall takes flags only and touches no Rust-visible memory.
    let result = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's scheduling policy and priority (for logs and tests).
pub fn current() -> (i32, i32) {
    // SAFETY: both calls only read the calling thread's scheduling state.
    let policy = unsafe { libc::sched_getscheduler(0) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, writable sched_param for the call's duration.
    unsafe { libc::sched_getparam(0, &mut param) };
    (policy & !libc::SCHED_RESET_ON_FORK, param.sched_priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a thread of its own, so the test runner's other threads keep their policy.
    #[test]
    fn realtime_priority_is_taken_where_permitted_and_refused_cleanly_where_not() {
        std::thread::spawn(|| match realtime(5) {
            Ok(()) => {
                assert_eq!(current(), (libc::SCHED_RR, 5));
                // Reset on fork resets new threads as well...
                let plain = std::thread::spawn(current).join().unwrap();
                assert_eq!(plain, (libc::SCHED_OTHER, 0));
                // ...so the runtime's threads, where the sessions run, ask for it.
                let runtime = runtime(Some(5)).unwrap();
                let worker = runtime.block_on(async { tokio::spawn(async { current() }).await.unwrap() });
                assert_eq!(worker, (libc::SCHED_RR, 5));
                let blocking =
                    runtime.block_on(async { tokio::task::spawn_blocking(current).await.unwrap() });
                assert_eq!(blocking, (libc::SCHED_RR, 5));
                // A hook's process starts at normal priority.
                let hook = std::process::Command::new("chrt").arg("-p").arg("0").output();
                if let Ok(hook) = hook {
                    let text = String::from_utf8_lossy(&hook.stdout);
                    assert!(text.contains("SCHED_OTHER"), "{text}");
                }
            }
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::EPERM), "{error}");
                assert_eq!(current().0, libc::SCHED_OTHER);
            }
        })
        .join()
        .unwrap();
    }
}
