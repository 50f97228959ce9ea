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
        }
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
