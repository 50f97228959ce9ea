//! Placement: which process server and master target a newly protected machine goes to.
//! Plain functions over observed load; no I/O.
use crate::state::NodeRecord;

/// Load of one candidate node as the configuration node sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub node: &'a NodeRecord,
    pub machines: u32,
    pub alive: bool,
}

/// The live, undrained candidate with the most headroom (capacity minus machines), ties broken
/// by name so placement is deterministic.
pub fn pick<'a>(candidates: &[Candidate<'a>]) -> Option<&'a NodeRecord> {
    candidates
        .iter()
        .filter(|c| c.alive && !c.node.drained)
        .max_by(|a, b| {
            let ha = a.node.capacity as i64 - a.machines as i64;
            let hb = b.node.capacity as i64 - b.machines as i64;
            ha.cmp(&hb).then_with(|| b.node.name.cmp(&a.node.name))
        })
        .map(|c| c.node)
}

/// [`pick`] among the candidates `prefer` accepts, else among all. Placement keeps a
/// machine's process server at the machine's own site and its master target at another site
/// when it can ([`process_server_site`], [`master_target_site`]), and falls back rather than
/// leave the machine unplaced (a single-site cluster works as before sites existed).
pub fn pick_preferring<'a>(
    candidates: &[Candidate<'a>],
    prefer: impl Fn(&NodeRecord) -> bool,
) -> Option<&'a NodeRecord> {
    let preferred: Vec<Candidate<'a>> = candidates
        .iter()
        .filter(|c| prefer(c.node))
        .cloned()
        .collect();
    pick(&preferred).or_else(|| pick(candidates))
}

/// The forward stream's process server: at the machine's site.
pub fn process_server_site(machine_site: &str) -> impl Fn(&NodeRecord) -> bool + '_ {
    move |n| n.site == machine_site
}

/// The forward stream's master target: at another site than the machine's (the recovery
/// site), so a disaster at the machine's site leaves its replica.
pub fn master_target_site(machine_site: &str) -> impl Fn(&NodeRecord) -> bool + '_ {
    move |n| n.site != machine_site
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, capacity: u32) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            roles: vec!["process".into()],
            addr: String::new(),
            capacity,
            drained: false,
            site: crate::state::default_site(),
        }
    }

    fn cand(node: &NodeRecord, machines: u32, alive: bool) -> Candidate<'_> {
        Candidate {
            node,
            machines,
            alive,
        }
    }

    #[test]
    fn sites_are_preferred_and_fall_back_when_none_is_live() {
        let (a, mut b, mut c) = (node("a", 10), node("b", 10), node("c", 10));
        b.site = "dr".into();
        c.site = "dr".into();
        // a has more headroom, but the master target goes to the other site.
        let cands = [cand(&a, 0, true), cand(&b, 5, true), cand(&c, 3, true)];
        let mt = pick_preferring(&cands, master_target_site("primary")).unwrap();
        assert_eq!(mt.name, "c");
        let ps = pick_preferring(&cands, process_server_site("primary")).unwrap();
        assert_eq!(ps.name, "a");
        // The dr site down: the master target falls back to the machine's own site.
        let cands = [cand(&a, 0, true), cand(&b, 5, false), cand(&c, 3, false)];
        assert_eq!(
            pick_preferring(&cands, master_target_site("primary"))
                .unwrap()
                .name,
            "a"
        );
        // A machine at dr: its process server at dr even with less headroom.
        let cands = [cand(&a, 0, true), cand(&b, 9, true), cand(&c, 3, true)];
        assert_eq!(
            pick_preferring(&cands, process_server_site("dr"))
                .unwrap()
                .name,
            "c"
        );
        assert!(pick_preferring(&[], process_server_site("dr")).is_none());
    }

    #[test]
    fn most_headroom_wins_and_dead_or_drained_are_skipped() {
        let (a, b, mut c) = (node("a", 10), node("b", 10), node("c", 100));
        c.drained = true;
        let cands = [
            Candidate {
                node: &a,
                machines: 3,
                alive: true,
            },
            Candidate {
                node: &b,
                machines: 1,
                alive: true,
            },
            Candidate {
                node: &c,
                machines: 0,
                alive: true,
            },
        ];
        assert_eq!(pick(&cands).unwrap().name, "b");
        let cands = [
            Candidate {
                node: &a,
                machines: 3,
                alive: true,
            },
            Candidate {
                node: &b,
                machines: 1,
                alive: false,
            },
        ];
        assert_eq!(pick(&cands).unwrap().name, "a");
        assert!(pick(&[]).is_none());
    }

    #[test]
    fn ties_break_by_name() {
        let (a, b) = (node("a", 5), node("b", 5));
        let cands = [
            Candidate {
                node: &b,
                machines: 0,
                alive: true,
            },
            Candidate {
                node: &a,
                machines: 0,
                alive: true,
            },
        ];
        assert_eq!(pick(&cands).unwrap().name, "a");
    }
}
