//! `haven ctl --json` as a subprocess: the admin client the tests and benches drive a
//! cluster with, exactly as an operator would.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, ExitStatus, Output, Stdio},
};

use serde_json::Value;

use crate::Res;

pub struct Ctl {
    /// The `haven` binary.
    pub bin: PathBuf,
    /// The configuration node.
    pub addr: String,
    /// The admin token file.
    pub token: PathBuf,
}

impl Ctl {
    pub fn new(
        bin: impl Into<PathBuf>,
        addr: impl Into<String>,
        token: impl Into<PathBuf>,
    ) -> Self {
        Self {
            bin: bin.into(),
            addr: addr.into(),
            token: token.into(),
        }
    }

    /// `haven ctl --cluster ADDR --token-file TOKEN --json ARGS`, stdin closed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("ctl")
            .arg("--cluster")
            .arg(&self.addr)
            .arg("--token-file")
            .arg(&self.token)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs `ctl ARGS` to completion, whatever its exit status.
    pub fn output(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command(args).output()
    }

    /// The JSON answer of `ctl ARGS`; Err if it fails or prints something else.
    pub fn call(&self, args: &[&str]) -> Res<Value> {
        let out = self
            .output(args)
            .map_err(|e| format!("run haven ctl: {e}"))?;
        Self::answer(args, out.status, &out.stdout, &out.stderr)
    }

    /// What a finished `ctl ARGS` answered: its JSON, or Err with why not.
    pub fn answer(args: &[&str], status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> Res<Value> {
        if !status.success() {
            return Err(format!(
                "`haven ctl {}` failed ({status}): {}",
                args.join(" "),
                String::from_utf8_lossy(stderr).trim()
            ));
        }
        serde_json::from_slice(stdout).map_err(|e| {
            format!(
                "`haven ctl {}` printed non-JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(stdout)
            )
        })
    }

    /// A listing (`machines`, `nodes`, `events`).
    pub fn array(&self, what: &str) -> Res<Vec<Value>> {
        self.call(&[what])?
            .as_array()
            .cloned()
            .ok_or_else(|| format!("`ctl --json {what}` is not an array"))
    }

    /// Machine name -> machine object.
    pub fn machines(&self) -> Res<HashMap<String, Value>> {
        Ok(self
            .array("machines")?
            .into_iter()
            .filter_map(|m| Some((m["name"].as_str()?.to_string(), m)))
            .collect())
    }

    /// One machine's object, None if it is not listed.
    pub fn machine(&self, name: &str) -> Res<Option<Value>> {
        Ok(self
            .array("machines")?
            .into_iter()
            .find(|m| m["name"] == name))
    }

    /// Whether node `name` is listed and alive.
    pub fn node_alive(&self, name: &str) -> Res<bool> {
        Ok(self
            .array("nodes")?
            .iter()
            .any(|n| n["name"] == name && n["alive"] == true))
    }
}
