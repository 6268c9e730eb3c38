//! Child processes of a test: logged to a file, killed when dropped, and
//! by the kernel when the test binary exits.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex, OnceLock},
};

use crate::{lock, unique_id};

/// A child process with its log, killed when dropped, and by the kernel
/// when the test binary exits.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` as `name`, its output logged in `dir`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}-{}.log", unique_id()));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("creating {log:?}: {e}"));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cloning {log:?}: {e}"));
        command.stdin(Stdio::null()).stdout(file).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches only this child.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_kept(command).unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Process { child, log }
    }

    /// Whether it has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns from one thread that lives as long as the test binary: the
/// kernel's parent-death signal follows the spawning thread, and a test's
/// threads end before the binary does.
fn spawn_kept(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, received) = mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, answer) in received {
                let _ = answer.send(command.spawn());
            }
        });
        Mutex::new(requests)
    });
    let (answer, answered) = mpsc::channel();
    lock(spawner)
        .send((command, answer))
        .map_err(|_| std::io::Error::other("the spawning thread is gone"))?;
    answered
        .recv()
        .map_err(|_| std::io::Error::other("the spawning thread is gone"))?
}
