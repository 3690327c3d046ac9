//! Choosing a node: a pure function from the loads of the nodes that have
//! headroom to one choice.
//!
//! The lowest tier with an eligible node is filled first; within it, the
//! least-loaded node wins: lowest utilisation over its limited
//! dimensions, then fewest requests in flight. Nodes equal on both are taken
//! in turn, starting from `rotation` (a counter the caller advances per
//! request), so equal nodes share evenly instead of all traffic going to the
//! first. Nothing here reads a clock, a lock or a random source, so the
//! choice is fully determined by its inputs.

use crate::snapshot::NodeId;

/// Picks among `(node, standing)` pairs of eligible nodes, the lowest
/// standing first: a [`Load`](crate::limits::Load), or `(tier, load)` (the lowest tier with an
/// eligible node, then the least loaded in it); `node_count` is the size of
/// the id space the rotation runs over.
pub fn choose<S: Ord>(
    eligible: impl IntoIterator<Item = (NodeId, S)>,
    rotation: usize,
    node_count: usize,
) -> Option<NodeId> {
    let n = node_count.max(1);
    let start = rotation % n;
    eligible
        .into_iter()
        .min_by(|(a, sa), (b, sb)| {
            let turn = |id: &NodeId| (id.index() + n - start) % n;
            sa.cmp(sb).then_with(|| turn(a).cmp(&turn(b)))
        })
        .map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Load;

    fn id(index: usize) -> NodeId {
        NodeId::from_index(index)
    }

    fn load(utilisation_ppm: u32, in_flight: u64) -> Load {
        Load {
            utilisation_ppm,
            in_flight,
        }
    }

    /// Nodes 0, 1, 2 with these (utilisation, in flight).
    fn three(loads: [(u32, u64); 3]) -> [(NodeId, Load); 3] {
        let mut i = 0;
        loads.map(|(ppm, in_flight)| {
            i += 1;
            (id(i - 1), load(ppm, in_flight))
        })
    }

    #[test]
    fn the_least_utilised_node_wins() {
        let nodes = three([(500_000, 0), (100_000, 9), (300_000, 0)]);
        assert_eq!(choose(nodes, 0, 3), Some(id(1)));
    }

    #[test]
    fn fewer_in_flight_breaks_a_utilisation_tie() {
        let nodes = three([(0, 3), (0, 1), (0, 2)]);
        assert_eq!(choose(nodes, 0, 3), Some(id(1)));
    }

    #[test]
    fn the_lowest_tier_with_an_eligible_node_wins_however_loaded() {
        // Node 0 (tier 1) is idle, nodes 1 and 2 (tier 0) are busier:
        // tier 0 first, the less loaded of it.
        let nodes = [
            (id(0), (1, load(0, 0))),
            (id(1), (0, load(900_000, 4))),
            (id(2), (0, load(800_000, 4))),
        ];
        assert_eq!(choose(nodes, 0, 3), Some(id(2)));
        // Tier 0 has no headroom (absent): tier 1 takes it.
        assert_eq!(choose([(id(0), (1, load(0, 0)))], 0, 3), Some(id(0)));
    }

    #[test]
    fn equal_nodes_are_taken_in_turn() {
        let nodes = three([(0, 0); 3]);
        let picks: Vec<_> = (0..6)
            .map(|r| choose(nodes, r, 3).unwrap().index())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn rotation_skips_nodes_that_are_not_eligible() {
        // Node 1 has no headroom, so it is absent; rotation 1 falls to node 2.
        let nodes = [(id(0), load(0, 0)), (id(2), load(0, 0))];
        assert_eq!(choose(nodes, 1, 3), Some(id(2)));
    }

    #[test]
    fn nothing_eligible_chooses_nothing() {
        assert_eq!(choose(std::iter::empty::<(NodeId, Load)>(), 7, 3), None);
    }

    #[test]
    fn the_choice_is_always_one_of_the_eligible_nodes() {
        // A small exhaustive property check: for every subset of 6 nodes with
        // assorted loads and every rotation, the choice is in the subset and
        // no eligible node is strictly less loaded.
        let loads = [
            load(10, 1),
            load(0, 0),
            load(10, 0),
            load(999, 5),
            load(0, 0),
            load(10, 1),
        ];
        for mask in 0u32..64 {
            let eligible: Vec<_> = (0..6)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| (id(i), loads[i]))
                .collect();
            for rotation in 0..12 {
                let chosen = choose(eligible.iter().copied(), rotation, 6);
                match chosen {
                    None => assert!(eligible.is_empty()),
                    Some(c) => {
                        let c = c.index();
                        assert!(mask & (1 << c) != 0, "chose ineligible node {c}");
                        assert!(eligible.iter().all(|(_, l)| *l >= loads[c]));
                    }
                }
            }
        }
    }
}
