//! The freeze and thaw commands of app-consistent points (`haven agent --freeze-cmd CMD
//! --thaw-cmd CMD [--freeze-timeout DUR]`): each runs as `sh -c CMD` in a process group of its
//! own, with stdin and stdout closed, and is killed (the whole group) at the timeout.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::fsutil::unix_ms;

/// Default of `--freeze-timeout` (the thaw gets the same).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a failed command's stderr kept for the event.
const STDERR_TAIL: usize = 400;

/// The agent's freeze and thaw commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub freeze: String,
    pub thaw: String,
    pub timeout: Duration,
}

/// Why a freeze or thaw command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot run sh: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("{status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed { status: String, stderr: String },
    #[error("timed out after {}; killed", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("waiting for it: {0}")]
    Wait(#[source] std::io::Error),
}

/// Runs `sh -c cmd`, killing its process group after `timeout`.
pub async fn run(cmd: &str, timeout: Duration) -> Result<(), HookError> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(HookError::Spawn)?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let text = text.trim();
            let cut = text.len().saturating_sub(STDERR_TAIL);
            let cut = (cut..=text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            Err(HookError::Failed {
                status: out.status.to_string(),
                stderr: text[cut..].to_string(),
            })
        }
        Ok(Err(e)) => Err(HookError::Wait(e)),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a negative pid signals the process group we created
                // for this command (process_group(0) above); no memory is involved.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            Err(HookError::TimedOut(timeout))
        }
    }
}

/// Where the agent records that a freeze is in effect (`<data dir>/agent/frozen`).
pub fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agent").join("frozen")
}

/// Records, durably, that the freeze of point request `request` is about to run.
pub fn mark_frozen(marker: &Path, request: u64) -> std::io::Result<()> {
    crate::fsutil::write_atomic(marker, format!("{request} {}\n", unix_ms()).as_bytes())
}

/// The thaw ran (or was tried): nothing is frozen by this agent any more.
pub fn clear_frozen(marker: &Path) {
    if let Err(e) = std::fs::remove_file(marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", marker.display());
        }
    }
}

/// At start: if the agent stopped (killed, crashed, power lost) between a freeze and its
/// thaw, the application may still be frozen; run the thaw now. Without a thaw command (the
/// agent was restarted without `--thaw-cmd`) say so loudly at every start until one runs.
pub async fn thaw_after_restart(data_dir: &Path, hooks: Option<&Hooks>) {
    let marker = marker_path(data_dir);
    let Ok(Some(what)) = crate::fsutil::read_optional(&marker) else {
        return;
    };
    let what = String::from_utf8_lossy(&what).trim().to_string();
    let Some(h) = hooks else {
        tracing::error!(
            marker = %marker.display(),
            "the agent stopped during a freeze ({what}) and has no --thaw-cmd now: the \
             application may still be frozen; thaw it by hand, then remove the marker"
        );
        return;
    };
    tracing::warn!("the agent stopped during a freeze ({what}): running the thaw command now");
    match run(&h.thaw, h.timeout).await {
        Ok(()) => tracing::info!("thawed after the restart"),
        Err(e) => tracing::warn!("thaw command after the restart failed: {e}"),
    }
    clear_frozen(&marker);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn success_failure_and_timeout() {
        run("true", Duration::from_secs(5)).await.unwrap();
        let e = run("echo nope >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Failed { .. }), "{e:?}");
        assert_eq!(e.to_string(), "exit status: 3: nope");
        let t = std::time::Instant::now();
        let e = run("sleep 30", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::TimedOut(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
