//! `haven ctl`'s output: the tables it prints. The client itself is `haven_roles::admin`.
use std::time::Duration;

pub use haven_roles::admin::*;
use haven_roles::view::{MachineView, NodeView};

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn print_nodes(nodes: &[NodeView]) {
    println!(
        "{:<16} {:<10} {:<36} {:<22} {:<6} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "NODE",
        "SITE",
        "ROLES",
        "ADDRESS",
        "ALIVE",
        "MACHINES",
        "CAPACITY",
        "IN/s",
        "OUT/s",
        "CACHE"
    );
    for n in nodes {
        let alive = match (n.alive, n.drained) {
            (true, true) => "drain",
            (true, false) => "yes",
            (false, _) => "no",
        };
        println!(
            "{:<16} {:<10} {:<36} {:<22} {:<6} {:>8} {:>8} {:>10} {:>10} {:>10}",
            n.name,
            n.site,
            n.roles.join(","),
            n.addr,
            alive,
            n.machines,
            n.capacity,
            human_bytes(n.bytes_in_per_sec),
            human_bytes(n.bytes_out_per_sec),
            human_bytes(n.cache_bytes),
        );
    }
}

pub fn print_machines(machines: &[MachineView]) {
    println!(
        "{:<14} {:<10} {:<20} {:<12} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "MACHINE",
        "SITE",
        "STATE",
        "PROCESS",
        "TARGET",
        "CAPTURED",
        "APPLIED",
        "RPO(s)",
        "RAW SENT",
        "WIRE SENT",
        "RATE/s"
    );
    for m in machines {
        let state = match (&m.state[..], m.initial_sync_percent, &m.degraded_reason) {
            ("initial-sync", Some(p), _) => format!("initial-sync {p:.0}%"),
            _ => m.state.clone(),
        };
        // No complete replica yet (or nothing known of it): no recovery point to speak of.
        let rpo = m
            .rpo_seconds
            .map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<10} {:<20} {:<12} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
            m.name,
            m.site,
            state,
            m.process_server.as_deref().unwrap_or("-"),
            m.master_target.as_deref().unwrap_or("-"),
            m.captured_seq,
            m.applied_seq,
            rpo,
            human_bytes(m.raw_bytes_sent),
            human_bytes(m.wire_bytes_sent),
            human_bytes(m.throughput_bytes_per_sec),
        );
        if let Some(reason) = &m.blocked_reason {
            println!("  blocked (needs you): {reason}");
        } else if let Some(reason) = &m.degraded_reason {
            println!("  degraded: {reason}");
        }
        // Reprotected: how far behind the recovery disks the original site is.
        if let Some(r) = m
            .failover
            .as_ref()
            .and_then(|f| f.reverse.as_ref())
            .filter(|r| r.done_pass > 0 && r.done_pass == r.pass)
        {
            println!(
                "  reverse: the original disks hold every recovery-site write from before {} (pass {}; compared {}{})",
                time_text(r.started_ms),
                r.done_pass,
                size_text(r.bytes_compared),
                if r.tracked { ", tracked" } else { ", every block" }
            );
        }
        // Recovery: capture mode, the newest point, history held vs asked, warnings.
        if m.state != "discovered" {
            let mut parts = vec![format!("capture {}", m.capture.as_deref().unwrap_or("?"))];
            if let Some(g) = &m.group {
                parts.push(format!("group {g}"));
            }
            match (&m.latest_point, m.latest_point_age_seconds) {
                (Some(p), Some(age)) => parts.push(format!(
                    "{} points, latest {p} ({age:.1}s ago)",
                    m.recovery_points
                )),
                _ => parts.push("no recovery point yet".into()),
            }
            if let (Some(held), Some(asked)) = (m.history_held_seconds, m.history_asked_seconds) {
                parts.push(format!(
                    "history {} of {}",
                    humantime::format_duration(Duration::from_secs(held as u64)),
                    humantime::format_duration(Duration::from_secs(asked as u64))
                ));
            }
            if let Some(p) = &m.test_failover {
                parts.push(format!("test failover of point {p} active"));
            }
            println!("  {}", parts.join("; "));
            if m.journal_cap_reached {
                println!("  warning: the journal's size cap cut history short of the retention window (raise --journal-size)");
            }
            if let Some(why) = &m.points_not_consistent {
                println!("  points are not crash-consistent now: {why}");
            }
        }
    }
}

fn time_text(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn print_tokens(tokens: &[haven_roles::view::TokenView]) {
    println!(
        "{:<14} {:<6} {:<21} {:<21} {:<8} {:>5}  DESCRIPTION",
        "ID", "KIND", "CREATED", "EXPIRES", "STATE", "USES"
    );
    for t in tokens {
        let state = match (t.revoked, t.expired) {
            (true, _) => "revoked",
            (false, true) => "expired",
            (false, false) => "valid",
        };
        println!(
            "{:<14} {:<6} {:<21} {:<21} {:<8} {:>5}  {}",
            t.id,
            t.kind,
            time_text(t.created_ms),
            t.expires_ms
                .map(time_text)
                .unwrap_or_else(|| "never".into()),
            state,
            t.uses,
            t.description
        );
    }
}

pub fn print_events(events: &[haven_roles::view::EventView]) {
    println!(
        "{:>8} {:<10} {:<14} {:<10} {:<10} {:>4} {:>9} {:>10}  REASON",
        "AGO(s)", "KIND", "MACHINE", "FROM", "TO", "GEN", "PAUSE(ms)", "RESENT"
    );
    for e in events {
        println!(
            "{:>8.1} {:<10} {:<14} {:<10} {:<10} {:>4} {:>9} {:>10}  {}",
            e.age_ms as f64 / 1000.0,
            e.kind,
            e.machine,
            e.from.as_deref().unwrap_or("-"),
            e.to.as_deref().unwrap_or("-"),
            e.generation,
            e.pause_ms
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            e.bytes_resent
                .map(human_bytes)
                .unwrap_or_else(|| "-".into()),
            e.reason
        );
    }
}

fn span_text(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

/// The points table and a summary; `newest`: only that many of the newest rows.
pub fn print_points(p: &haven_roles::view::RecoveryPointsView, newest: Option<usize>) {
    println!(
        "{:>12} {:>12} {:<24} {:<15} NAME",
        "POINT", "SEQ", "TIME", "KIND"
    );
    let skip = newest.map_or(0, |n| p.points.len().saturating_sub(n));
    for pt in &p.points[skip..] {
        println!(
            "{:>12} {:>12} {:<24} {:<15} {}",
            pt.point,
            pt.seq,
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_millis(pt.time_ms)
            ),
            pt.kind,
            pt.name.as_deref().unwrap_or("")
        );
    }
    println!(
        "{}: {} points; history held {} of {} asked; journal {} of {} cap{}",
        p.machine,
        p.points.len(),
        span_text(p.held_ms),
        span_text(p.retention_ms),
        size_text(p.journal_bytes),
        size_text(p.journal_cap_bytes),
        if p.cap_reached {
            " (WARNING: the cap cut history short of the window)"
        } else {
            ""
        }
    );
    if let Some(t) = &p.test_failover {
        println!("test failover active at point {}", t.point.point);
    }
}

pub fn print_drill(t: &haven_roles::view::TestFailoverView) {
    println!(
        "{}: test failover of point {} ({}, {}) ready in {} ms; replication goes on",
        t.machine,
        t.point.point,
        time_text(t.point.time_ms),
        t.point.kind,
        t.elapsed_ms
    );
    for d in &t.disks {
        match (&d.nbd_uri, &d.image) {
            (Some(uri), _) => println!("  {}  {}", d.disk, uri),
            (None, Some(img)) => println!("  {}  {}", d.disk, img),
            _ => {}
        }
    }
}

pub fn print_failover(f: &haven_roles::view::FailoverView) {
    match (&f.point, f.stage.as_str()) {
        (_, "cancelled") => println!(
            "{}: failover cancelled; the recovery-site writes are discarded and forward replication resumes",
            f.machine
        ),
        (_, "failed-back") => {
            let b = f.failback.as_ref();
            println!(
                "{}: failed back: protected from its own site again after seq {}, with no full resync",
                f.machine,
                b.and_then(|b| b.materialised_seq).unwrap_or(0)
            );
            if let Some(r) = f.reverse.as_ref().filter(|r| r.done_pass > 0) {
                println!(
                    "  final reverse pass {}: rewrote {} blocks ({}) of the original disks",
                    r.done_pass,
                    r.blocks_written,
                    size_text(r.bytes_received)
                );
            }
            if let Some(b) = b {
                println!(
                    "  replica: compared {} with the recovery disks, rewrote {}",
                    size_text(b.bytes_compared),
                    size_text(b.bytes_written)
                );
            }
        }
        (Some(p), _) => {
            // The time to serve matters when the failover is new; later it is history.
            let served = match f.state.as_str() {
                "failover-pending" => format!(
                    "; served in {:.2} s (master target {} ms)",
                    f.elapsed_ms as f64 / 1000.0,
                    f.serve_ms.unwrap_or(0)
                ),
                _ => String::new(),
            };
            println!(
                "{}: {} at point {} ({}, {}){}{served}",
                f.machine,
                f.state,
                p.point,
                time_text(p.time_ms),
                p.kind,
                if f.planned { ", planned: no write lost" } else { "" },
            );
            for d in &f.disks {
                if let Some(uri) = &d.nbd_uri {
                    println!("  {}  {}", d.disk, uri);
                }
            }
            if let Some(r) = f.reverse.as_ref().filter(|r| r.done_pass > 0) {
                println!(
                    "  reprotect pass {}: compared {}{} by hash ({} of hashes sent), rewrote {} blocks ({}) of the original disks",
                    r.done_pass,
                    size_text(r.bytes_compared),
                    if r.tracked { " written since the pass before" } else { "" },
                    size_text(r.hash_bytes),
                    r.blocks_written,
                    size_text(r.bytes_received)
                );
            }
            if let (Some(b), Some(why)) = (&f.failback, &f.waiting_for) {
                println!("  failback {}: waiting for {why}", b.stage.name());
            }
            if f.state == "failover-pending" {
                println!(
                    "  commit with `haven ctl failover-commit {m}`, or `failover-change-point {m} --point P`, `failover-cancel {m}`",
                    m = f.machine
                );
            }
        }
        (None, stage) => println!(
            "{}: {} ({stage}): {}",
            f.machine,
            f.state,
            f.error
                .as_deref()
                .or(f.waiting_for.as_deref())
                .unwrap_or("")
        ),
    }
}

fn size_text(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

pub fn print_groups(groups: &[haven_roles::view::GroupView]) {
    if groups.is_empty() {
        return;
    }
    println!(
        "{:<14} {:<30} {:>8} {:>8} {:<24} MEMBERS",
        "GROUP", "STATE", "EVERY", "POINTS", "LATEST"
    );
    for g in groups {
        let every = match g.point_every_ms {
            0 => "off".to_string(),
            ms => humantime::format_duration(Duration::from_millis(ms)).to_string(),
        };
        let latest = g
            .latest_point
            .as_ref()
            .map(|p| format!("{} ({})", p.id, time_text(p.time_ms)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<30} {:>8} {:>8} {:<24} {}",
            g.name,
            g.state,
            every,
            g.points,
            latest,
            g.members.join(",")
        );
        if let Some(e) = &g.last_error {
            println!("  {e}");
        }
    }
}

/// A point's name as the point lines show it: ` "name"`, or nothing.
pub fn name_text(name: Option<&str>) -> String {
    name.map(|n| format!(" {n:?}")).unwrap_or_default()
}

pub fn print_group_point(p: &haven_roles::view::GroupPointView) {
    let name = name_text(p.name.as_deref());
    println!(
        "group {}: point {}{name} at {}, one cut across {} members",
        p.group,
        p.id,
        time_text(p.time_ms),
        p.members.len()
    );
    for (m, seq) in &p.members {
        println!("  {m}  point {seq}");
    }
}

pub fn print_group_points(group: &str, points: &[haven_roles::view::GroupPointView]) {
    println!(
        "{:>8} {:<24} {:<40} NAME",
        "POINT", "TIME", "MEMBERS (POINT)"
    );
    for p in points {
        let members: Vec<String> = p.members.iter().map(|(m, s)| format!("{m}:{s}")).collect();
        let pruned = if p.pruned.is_empty() {
            String::new()
        } else {
            format!("  (pruned at {})", p.pruned.join(","))
        };
        println!(
            "{:>8} {:<24} {:<40} {}{pruned}",
            p.id,
            time_text(p.time_ms),
            members.join(" "),
            p.name.as_deref().unwrap_or("")
        );
    }
    println!("{group}: {} group points", points.len());
}
