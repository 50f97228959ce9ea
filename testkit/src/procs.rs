//! The `haven` processes a test or bench starts: each logs to `<dir>/<name>.log` (appended
//! to across restarts), can be killed and restarted with the same arguments, and is stopped
//! when the [`Procs`] is dropped, on errors and panics too.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{wait::poll, Ctl, Res};

/// How [`Procs`] ends what still runs when it is dropped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// SIGKILL at once: a test's processes have nothing to finish.
    Kill,
    /// SIGTERM to all, then SIGKILL to whatever still runs `grace` later (per process), so a
    /// bench's processes shut down as they would in production.
    Term { grace: Duration },
}

pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    /// Environment variables, given at every (re)start.
    pub env: Vec<(String, String)>,
    /// A network namespace to run in (`ip netns exec`).
    pub netns: Option<String>,
    pub child: Option<Child>,
}

pub struct Procs {
    bin: PathBuf,
    log_dir: PathBuf,
    /// Given to every process after its own environment, so these win.
    env: Vec<(String, String)>,
    stop: Stop,
    poll_every: Duration,
    /// In the order they were started.
    list: Vec<Proc>,
}

impl Procs {
    /// Processes of `bin`, logging into `log_dir`. They get SIGTERM on drop (see [`Stop`]);
    /// [`Procs::wait_until`] polls every 50 ms.
    pub fn new(bin: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            log_dir: log_dir.into(),
            env: vec![],
            stop: Stop::Term {
                grace: Duration::from_secs(5),
            },
            poll_every: Duration::from_millis(50),
            list: vec![],
        }
    }

    pub fn stop_with(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    /// An environment variable for every process, over what the process's own says.
    pub fn env_for_all(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Starts `bin args` as `name`.
    pub fn start<S: AsRef<str>>(&mut self, name: &str, args: &[S]) -> Res<()> {
        self.start_with(name, None, args, vec![])
    }

    /// Starts `bin args` as `name` with environment variables `env`, in network namespace
    /// `netns` if given.
    pub fn start_with<S: AsRef<str>>(
        &mut self,
        name: &str,
        netns: Option<String>,
        args: &[S],
        env: Vec<(String, String)>,
    ) -> Res<()> {
        if self.get(name).is_some() {
            return Err(format!("there is already a process {name}"));
        }
        self.list.push(Proc {
            name: name.into(),
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            env,
            netns,
            child: None,
        });
        self.restart(name)
    }

    /// (Re)starts a process that is not running with its arguments and environment.
    pub fn restart(&mut self, name: &str) -> Res<()> {
        let log_path = self.log(name);
        let (bin, env) = (&self.bin, &self.env);
        let p = self
            .list
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("no process {name}"))?;
        if p.child.is_some() {
            return Err(format!("{name} is already running"));
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        // `ip netns exec` execs the command, so the child's pid is haven's.
        let mut cmd = match &p.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(&p.args)
            .envs(p.env.iter().chain(env).map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        p.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self, name: &str) -> Res<()> {
        let p = self
            .get_mut(name)
            .ok_or_else(|| format!("no process {name}"))?;
        let mut c = p
            .child
            .take()
            .ok_or_else(|| format!("{name} is not running"))?;
        c.kill().map_err(|e| format!("kill {name}: {e}"))?;
        c.wait().map_err(|e| format!("wait {name}: {e}"))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Proc> {
        self.list.iter().find(|p| p.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Proc> {
        self.list.iter_mut().find(|p| p.name == name)
    }

    /// Every process's name, in the order they were started.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|p| p.name.as_str())
    }

    /// The pid of a running process.
    pub fn pid(&self, name: &str) -> Option<u32> {
        Some(self.get(name)?.child.as_ref()?.id())
    }

    /// How a process that was started exited, if it has.
    pub fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        self.get_mut(name)?.child.as_mut()?.try_wait().ok()?
    }

    /// Err, with the end of its log, if any process exited.
    pub fn check_alive(&mut self) -> Res<()> {
        for i in 0..self.list.len() {
            let name = self.list[i].name.clone();
            if let Some(status) = self.exited(&name) {
                let log = self.log(&name);
                return Err(format!(
                    "the {name} process exited ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 20)
                ));
            }
        }
        Ok(())
    }

    /// Polls `ok` until it is true (Ok: how long that took), while every process runs; Err
    /// if one exited, or after `timeout` (with `ok`'s last error).
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut() -> Res<bool>,
    ) -> Res<Duration> {
        let t0 = Instant::now();
        let mut last_err = String::new();
        let done = poll(timeout, self.poll_every, || {
            if let Err(e) = self.check_alive() {
                return Some(Err(e));
            }
            match ok() {
                Ok(true) => Some(Ok(t0.elapsed())),
                Ok(false) => None,
                Err(e) => {
                    last_err = e;
                    None
                }
            }
        });
        done.unwrap_or_else(|| {
            Err(format!(
                "timed out after {}s waiting for {what}{}",
                timeout.as_secs(),
                if last_err.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last_err})")
                }
            ))
        })
    }

    /// Waits until the configuration node listening on `addr` with data in `data_dir` has
    /// written its tokens (admin, agent and node: bootstrap writes all three) and answers
    /// `ctl status`; returns its admin client.
    pub fn configuration_ready(&mut self, addr: &str, data_dir: &Path) -> Res<Ctl> {
        let tokens = ["admin-token", "agent-token", "node-token"].map(|t| data_dir.join(t));
        self.wait_until(
            "the configuration node to write its tokens",
            Duration::from_secs(30),
            || Ok(tokens.iter().all(|t| t.exists())),
        )?;
        let ctl = Ctl::new(&self.bin, addr, &tokens[0]);
        self.wait_until(
            "the configuration node to answer",
            Duration::from_secs(30),
            || Ok(ctl.call(&["status"]).is_ok()),
        )?;
        Ok(ctl)
    }

    /// Ends every process that still runs, as [`Stop`] says.
    pub fn stop_all(&mut self) {
        if let Stop::Term { .. } = self.stop {
            for c in self.list.iter_mut().filter_map(|p| p.child.as_mut()) {
                if let Ok(None) = c.try_wait() {
                    let _ = Command::new("kill")
                        .arg("-TERM")
                        .arg(c.id().to_string())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        for mut c in self.list.iter_mut().filter_map(|p| p.child.take()) {
            if let Stop::Term { grace } = self.stop {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The last `lines` lines of a file (of a log), empty if it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
