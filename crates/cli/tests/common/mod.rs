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
