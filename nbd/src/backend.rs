//! What an export serves: the [`Backend`] trait, the io-error → NBD-error mapping, and
//! [`FileBackend`], a plain file or block device.
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::proto;

/// The storage behind one export.
///
/// The server calls these only with requests it has checked: `offset + len <= size()`,
/// `len <= MAX_PAYLOAD` for reads and writes, and no write, trim or zeroing on a read-only
/// backend. Calls may run concurrently (up to the connection's in-flight bound, on every
/// connection at once); a write is acknowledged to the client once its future resolves.
/// `read` must return exactly `len` bytes (anything else is answered EIO).
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    /// A flush on any connection makes every write acknowledged on any connection durable.
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>>;
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>>;
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<()>>;
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>>;
}

/// The NBD error a backend's io error is answered with: ENOSPC (and EDQUOT, EFBIG) → ENOSPC,
/// EPERM, EACCES and EROFS → EPERM, `InvalidInput` → EINVAL, anything else EIO.
pub fn nbd_error(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => return proto::ENOSPC,
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => return proto::EPERM,
        Some(libc::EINVAL) => return proto::EINVAL,
        Some(_) => return proto::EIO,
        None => {}
    }
    match e.kind() {
        io::ErrorKind::InvalidInput => proto::EINVAL,
        io::ErrorKind::PermissionDenied => proto::EPERM,
        _ => proto::EIO,
    }
}

/// A file (or block device) served as it is: reads and writes are `pread`/`pwrite` on the
/// blocking pool, through the page cache; flush and FUA are `fdatasync`; trim punches a hole
/// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); zeroing is `fallocate(ZERO_RANGE)`, else a punched
/// hole; both fall back to writing zeros where the filesystem supports neither.
#[derive(Debug, Clone)]
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    read_only: bool,
}

const ZERO_CHUNK: usize = 1 << 20;

impl FileBackend {
    /// Opens `path` read-write (or read-only); the export's size is the file's size now.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Serves an open file. A read-only backend never writes to it.
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<Self> {
        // Seeking to the end also sizes block devices (whose metadata says 0).
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileBackend {
            file: Arc::new(file),
            size,
            read_only,
        })
    }

    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&file))
                .await
                .map_err(io::Error::other)?
        })
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u32) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate on a valid, open file descriptor with plain integer arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, libc::off_t::from(len)) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an fallocate error means "this file (system) cannot do that mode".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

fn write_zeros(file: &File, offset: u64, len: u32) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < u64::from(len) {
        let n = (u64::from(len) - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn eof_is_eio(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::from_raw_os_error(libc::EIO)
    } else {
        e
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        self.blocking(move |file| {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).map_err(eof_is_eio)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        self.blocking(move |file| {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        self.blocking(|file| file.sync_data())
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<()>> {
        self.blocking(move |file| {
            match fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => write_zeros(file, offset, len),
                r => r,
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        self.blocking(move |file| {
            let zeroed = match fallocate(file, libc::FALLOC_FL_ZERO_RANGE, offset, len) {
                Err(e) if unsupported(&e) => fallocate(
                    file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ),
                r => r,
            };
            match zeroed {
                Err(e) if unsupported(&e) => write_zeros(file, offset, len)?,
                r => r?,
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(nbd_error(&os(libc::ENOSPC)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EDQUOT)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EPERM)), proto::EPERM);
        assert_eq!(nbd_error(&os(libc::EROFS)), proto::EPERM);
        assert_eq!(nbd_error(&os(libc::EIO)), proto::EIO);
        assert_eq!(nbd_error(&os(libc::ENOMEM)), proto::EIO);
        assert_eq!(
            nbd_error(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            proto::EINVAL
        );
        assert_eq!(nbd_error(&io::Error::other("x")), proto::EIO);
    }

    #[tokio::test]
    async fn file_backend_ops() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let b = FileBackend::from_file(file, false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        b.write(4096, vec![0xab; 8192], true).await.unwrap();
        assert_eq!(b.read(4096, 8192).await.unwrap(), vec![0xab; 8192]);
        b.trim(4096, 4096).await.unwrap();
        assert_eq!(b.read(4096, 4096).await.unwrap(), vec![0; 4096]);
        b.write_zeroes(8192, 100, false).await.unwrap();
        let r = b.read(8192, 4096).await.unwrap();
        assert!(r[..100].iter().all(|&x| x == 0) && r[100..].iter().all(|&x| x == 0xab));
        b.flush().await.unwrap();
        // Past the end of the file: EIO, never a short buffer.
        let e = b.read((1 << 20) - 10, 20).await.unwrap_err();
        assert_eq!(nbd_error(&e), proto::EIO);
        write_zeros(&b.file, 0, 3 * ZERO_CHUNK as u32 + 5).unwrap();
    }
}
