//! Scratch directories for the targets that decode files. On a tmpfs when there is one
//! (`/dev/shm`), so the decoders' fsyncs cost nothing; and with the file size limit set low
//! (`RLIMIT_FSIZE`), so an input that makes a decoder write far into a file (a restore at an
//! absurd offset) fails with `EFBIG` instead of filling the disk.
use std::path::PathBuf;
use std::sync::Once;

/// The largest file a target may write.
pub const MAX_FILE: u64 = 64 << 20;

fn base() -> PathBuf {
    if let Some(dir) = std::env::var_os("HAVEN_FUZZ_TMP") {
        return dir.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn limit_file_size() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain syscalls on values we own; ignoring SIGXFSZ makes a write past the
        // limit fail with EFBIG rather than kill the process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: MAX_FILE,
                rlim_max: MAX_FILE,
            };
            // The hard limit can only be lowered; keep an already lower one.
            let mut old = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_FSIZE, &mut old) == 0 && old.rlim_cur > MAX_FILE {
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            }
        }
    });
}

/// A fresh, empty directory, removed when dropped.
pub fn dir() -> tempfile::TempDir {
    limit_file_size();
    tempfile::Builder::new()
        .prefix("haven-fuzz-")
        .tempdir_in(base())
        .expect("create a scratch directory")
}
