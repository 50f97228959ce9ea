//! App-consistent and operator-requested recovery points through the CLI, against real
//! processes: a tap agent with `--freeze-cmd`/`--thaw-cmd` (shell commands that log to a file
//! and fail, pause or succeed as a mode file says), `ctl mark` (app, named, a freeze that fails
//! and, on a second agent with `--freeze-timeout 1s`, one that times out — crash-consistent
//! points, events, the thaw always run), writes
//! during a freeze that are not lost, `ctl test-failover --point latest-app`, the periodic
//! `ctl protect --app-consistent-every`, `ctl mark` refused with scan capture, and an agent
//! SIGKILLed during a freeze that runs the thaw when it starts again.
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use haven_testkit::{make_disk, wait_until};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SYNC: Duration = Duration::from_secs(120);

fn hooks_log(c: &Cluster) -> Vec<String> {
    std::fs::read_to_string(c.path("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn set_mode(c: &Cluster, mode: &str) {
    std::fs::write(c.path("mode"), mode).unwrap();
}

/// Every freeze was followed by a thaw before the next freeze (a freeze still running at the
/// end may lack its thaw).
#[track_caller]
fn assert_freeze_then_thaw(log: &[String]) {
    for (i, pair) in log.chunks(2).enumerate() {
        match pair {
            [f, t] => assert!(
                f == "freeze" && t == "thaw",
                "entry {}: a freeze and then its thaw: {log:?}",
                2 * i
            ),
            [f] => assert_eq!(f, "freeze", "{log:?}"),
            _ => unreachable!(),
        }
    }
}

fn points(c: &Cluster, m: &str) -> Vec<Value> {
    c.ctl(&["recovery-points", m])["points"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the master target lists point `seq` (it is applied) and returns it.
fn wait_point(c: &Cluster, m: &str, seq: u64) -> Value {
    wait_until(
        &format!("point {seq} listed"),
        Duration::from_secs(60),
        || {
            points(c, m)
                .into_iter()
                .find(|p| p["seq"].as_u64() == Some(seq))
        },
    )
}

fn events_of(c: &Cluster, m: &str, kind: &str) -> Vec<Value> {
    c.ctl(&["events"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["machine"] == m && e["kind"] == kind)
        .collect()
}

#[test]
fn app_consistent_points_freeze_flush_barrier_and_always_thaw() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 16 * MIB, 41);
    let log = c.path("hooks.log");
    let mode = c.path("mode");
    set_mode(&c, "ok");
    let freeze = format!(
        "echo freeze >> {log}; m=$(cat {mode}); \
         if [ \"$m\" = fail ]; then echo cannot freeze >&2; exit 1; fi; \
         if [ \"$m\" = slow ]; then sleep 5; fi; exit 0",
        log = log.display(),
        mode = mode.display()
    );
    let thaw = format!("echo thaw >> {}", log.display());
    c.start_agent_args(
        "m1",
        &[("d0", &disk)],
        &[
            "--capture",
            "tap",
            "--freeze-cmd",
            &freeze,
            "--thaw-cmd",
            &thaw,
        ],
    );
    c.wait_tap("m1", "d0");
    let u = c.tap_uri("m1", "d0");
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);
    assert!(hooks_log(&c).is_empty(), "no point asked for yet");

    phase("ctl mark --app --name: freeze, flush, an app point named before-upgrade, thaw");
    // Acknowledged but not flushed by the writer: the mark's flush makes it part of the point.
    qemu_io(&u, &["write -P 0xa1 0 1M"]);
    let marked = c.ctl(&["mark", "m1", "--app", "--name", "before-upgrade"]);
    assert_eq!(marked["kind"], "app", "{marked}");
    assert_eq!(marked["name"], "before-upgrade", "{marked}");
    assert_eq!(marked["warnings"], serde_json::json!([]), "{marked}");
    let seq = marked["seq"].as_u64().expect("seq");
    assert_eq!(marked["point"], seq.to_string().as_str());
    assert_eq!(hooks_log(&c), ["freeze", "thaw"], "freeze ran before thaw");
    let p = wait_point(&c, "m1", seq);
    assert_eq!(p["kind"], "app", "{p}");
    assert_eq!(p["name"], "before-upgrade", "{p}");
    assert_eq!(p["point"], seq.to_string().as_str());

    phase("test failover of latest-app serves the app point, with the write before it");
    qemu_io(&u, &["write -P 0xb2 0 64k", "flush"]); // after the point: not in its view
    c.wait_sync("m1", SYNC);
    let drill = c.ctl(&["test-failover", "m1", "--point", "latest-app"]);
    assert_eq!(drill["point"]["point"], seq.to_string().as_str(), "{drill}");
    assert_eq!(drill["point"]["kind"], "app", "{drill}");
    let view = drill["disks"][0]["nbd_uri"].as_str().expect("nbd_uri");
    qemu_io(view, &["read -P 0xa1 0 1M"]);
    let cleaned = c.ctl(&["test-failover-cleanup", "m1"]);
    assert_eq!(cleaned["replica_untouched"], true, "{cleaned}");

    phase("writes during a freeze are accepted at once and not lost");
    set_mode(&c, "slow");
    let client = c.client();
    let slow = std::thread::spawn(move || client.call(&["mark", "m1", "--app"]));
    wait_until("the slow freeze started", Duration::from_secs(30), || {
        (hooks_log(&c).len() == 3).then_some(())
    });
    let t = Instant::now();
    qemu_io(&u, &["write -P 0xc3 2M 256k", "write -P 0xc4 5M 4k"]);
    assert_eq!(
        hooks_log(&c).len(),
        3,
        "the writes completed while the freeze ran ({:?})",
        t.elapsed()
    );
    let slow = slow.join().unwrap().expect("the slow mark");
    assert_eq!(slow["kind"], "app", "{slow}");
    assert_eq!(hooks_log(&c).len(), 4);
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));

    phase("a failing freeze: a crash-consistent point, an event, and the thaw still ran");
    set_mode(&c, "fail");
    let failed = c.ctl(&["mark", "m1", "--app"]);
    assert_eq!(failed["kind"], "crash", "{failed}");
    let w = failed["warnings"][0].as_str().unwrap_or_default();
    assert!(
        w.contains("freeze failed") && w.contains("cannot freeze"),
        "{failed}"
    );
    assert_eq!(hooks_log(&c)[4..], ["freeze", "thaw"]);
    let p = wait_point(&c, "m1", failed["seq"].as_u64().unwrap());
    assert_eq!(p["kind"], "crash", "{p}");
    let ev = wait_until("the failed freeze's event", Duration::from_secs(10), || {
        events_of(&c, "m1", "app-point")
            .into_iter()
            .find(|e| e["reason"].as_str().unwrap_or("").contains("cannot freeze"))
    });
    assert!(ev["reason"].as_str().unwrap().contains("crash"), "{ev}");
    assert!(c.log("agent-m1").contains("freeze command failed"));

    phase("--name alone: a named crash-consistent point, no freeze");
    set_mode(&c, "ok");
    let named = c.ctl(&["mark", "m1", "--name", "plain"]);
    assert_eq!(named["kind"], "named", "{named}");
    assert_eq!(
        hooks_log(&c).len(),
        6,
        "no freeze for a point without --app"
    );

    phase("a freeze that times out (m2, --freeze-timeout 1s): killed, a named point, an event, the thaw ran");
    let disk2 = c.path("d2.img");
    make_disk(&disk2, 4 * MIB, 43);
    let log2 = c.path("hooks2.log");
    let hang = format!("echo freeze >> {}; sleep 60", log2.display());
    let thaw2 = format!("echo thaw >> {}", log2.display());
    c.start_agent_args(
        "m2",
        &[("d0", &disk2)],
        &[
            "--capture",
            "tap",
            "--freeze-cmd",
            &hang,
            "--thaw-cmd",
            &thaw2,
            "--freeze-timeout",
            "1s",
        ],
    );
    c.ctl(&["protect", "m2"]);
    c.wait_sync("m2", SYNC);
    let t = Instant::now();
    let hung = c.ctl(&["mark", "m2", "--app", "--name", "hung"]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(hung["kind"], "named", "{hung}");
    assert_eq!(hung["name"], "hung", "{hung}");
    assert!(
        hung["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 1s"),
        "{hung}"
    );
    let log2_lines = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(log2_lines.lines().collect::<Vec<_>>(), ["freeze", "thaw"]);
    let p = wait_point(&c, "m2", hung["seq"].as_u64().unwrap());
    assert_eq!(
        (p["kind"].as_str(), p["name"].as_str()),
        (Some("named"), Some("hung"))
    );
    wait_until(
        "the timed-out freeze's event",
        Duration::from_secs(10),
        || {
            events_of(&c, "m2", "app-point")
                .into_iter()
                .find(|e| e["reason"].as_str().unwrap_or("").contains("timed out"))
        },
    );
    assert!(c.log("agent-m2").contains("freeze command failed"));

    phase("--app-consistent-every 2s: app points come by themselves");
    let before = points(&c, "m1")
        .iter()
        .filter(|p| p["kind"] == "app")
        .count();
    c.ctl(&["protect", "m1", "--app-consistent-every", "2s"]);
    qemu_io(&u, &["write -P 0xd5 8M 64k"]);
    let t = Instant::now();
    wait_until("two periodic app points", Duration::from_secs(60), || {
        let apps = points(&c, "m1")
            .iter()
            .filter(|p| p["kind"] == "app")
            .count();
        (apps >= before + 2).then_some(())
    });
    // Two periods at least, each one's points a freeze and a thaw.
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(hooks_log(&c).len() >= 6 + 2 * 2, "{:?}", hooks_log(&c));
    c.ctl(&["protect", "m1", "--app-consistent-every", "0s"]);
    assert_freeze_then_thaw(&hooks_log(&c));
    let m = c.machine("m1").unwrap();
    assert_eq!(m["epoch"], 1, "no reprotect: {m}");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}

#[test]
fn a_mark_is_refused_with_scan_capture_and_freeze_needs_tap() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 8 * MIB, 42);
    c.start_agent("m2", &[("d0", &disk)]);
    c.ctl(&["protect", "m2"]);
    let out = c.ctl_output(&["mark", "m2", "--app"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "refused: {err}");
    assert!(err.contains("needs --capture tap"), "{err}");
    assert!(out.stdout.is_empty());

    // An agent with a freeze command but scan capture does not start.
    let out = std::process::Command::new(BIN)
        .args(c.agent_args("m3", &c.path("agent-m3")))
        .args(["--disk", &format!("d0={}", disk.display())])
        .args(["--freeze-cmd", "true", "--thaw-cmd", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--freeze-cmd needs --capture tap"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!Path::new(&c.path("agent-m3/identity")).exists());
}

/// An agent SIGKILLed between a freeze and its thaw: the application would stay frozen. The
/// freeze is recorded durably before it runs, and the agent, started again, runs the thaw.
#[test]
fn an_agent_killed_during_a_freeze_thaws_when_it_starts_again() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let disk = c.path("d0.img");
    make_disk(&disk, 4 * MIB, 44);
    let log = c.path("hooks.log");
    let freeze = format!("echo freeze >> {}; sleep 20", log.display());
    let thaw = format!("echo thaw >> {}", log.display());
    c.start_agent_args(
        "m1",
        &[("d0", &disk)],
        &[
            "--capture",
            "tap",
            "--freeze-cmd",
            &freeze,
            "--thaw-cmd",
            &thaw,
            "--freeze-timeout",
            "60s",
        ],
    );
    c.ctl(&["protect", "m1"]);
    c.wait_sync("m1", SYNC);

    phase("a mark whose freeze takes 20 s; the agent is SIGKILLed while it runs");
    let mut mark = c
        .client()
        .command(&["mark", "m1", "--app", "--timeout", "60s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = c.path("agent-m1/agent/frozen");
    wait_until("the freeze is running", Duration::from_secs(30), || {
        (hooks_log(&c) == ["freeze"] && marker.exists()).then_some(())
    });
    c.kill("agent-m1");
    let _ = mark.kill();
    let _ = mark.wait();
    assert_eq!(
        hooks_log(&c),
        ["freeze"],
        "no thaw ran: the agent was killed"
    );

    phase("the agent starts again: it runs the thaw at once");
    c.restart("agent-m1");
    wait_until(
        "the thaw after the restart",
        Duration::from_secs(30),
        || (hooks_log(&c) == ["freeze", "thaw"]).then_some(()),
    );
    wait_until("the marker removed", Duration::from_secs(10), || {
        (!marker.exists()).then_some(())
    });
    assert!(
        c.log("agent-m1").contains("stopped during a freeze"),
        "the restart says why it thaws"
    );
    // Replication goes on after it.
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
}
