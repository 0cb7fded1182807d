//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// A test's scratch folder: removed when the test passes, kept for a look when it fails (some hold
/// hundreds of MB of checkpoints, and every run would otherwise leave them behind).
pub struct TestDir(PathBuf);

impl TestDir {
    /// `<temp>/<name>-<pid>`, emptied first.
    pub fn new(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}

impl std::ops::Deref for TestDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `pirclip` as rank `rank` of 2, launched as torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*),
/// stdout discarded and stderr piped.
#[allow(dead_code)] // not every test file launches ranks
pub fn rank_command(rank: usize, port: u16) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pirclip"));
    c.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}
