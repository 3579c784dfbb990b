//! The partition planner gives every layer to exactly one node in contiguous ranges, starter
//! first; respects every memory budget; finds the same bottleneck as brute force over all
//! partitions on small cases; and says clearly when the model does not fit.

use mdi_core::plan::{plan, ModelCost, NodeProfile};
use mdi_core::sampling::Rng;

fn random_cost(rng: &mut Rng, layers: usize) -> ModelCost {
    ModelCost {
        layer_weight_bytes: (0..layers).map(|_| 100 + rng.next_u64() % 900).collect(),
        kv_bytes_per_token: 1 + rng.next_u64() % 4,
        layer_work: (0..layers)
            .map(|_| 1.0 + (rng.next_u64() % 100) as f64)
            .collect(),
        starter_weight_bytes: rng.next_u64() % 1500,
        starter_work: (rng.next_u64() % 200) as f64,
    }
}

/// All ways to cut `l` layers into `n` non-empty contiguous ranges.
fn compositions(l: usize, n: usize) -> Vec<Vec<usize>> {
    if n == 1 {
        return vec![vec![l]];
    }
    let mut out = Vec::new();
    for first in 1..=l - (n - 1) {
        for mut rest in compositions(l - first, n - 1) {
            rest.insert(0, first);
            out.push(rest);
        }
    }
    out
}

fn brute_force(cost: &ModelCost, nodes: &[NodeProfile], kv_tokens: u64) -> Option<f64> {
    let l = cost.n_layers();
    let mut best: Option<f64> = None;
    'outer: for sizes in compositions(l, nodes.len()) {
        let mut a = 0;
        let mut worst: f64 = 0.0;
        for (i, size) in sizes.iter().enumerate() {
            let b = a + size;
            let mut w: u64 = cost.layer_weight_bytes[a..b].iter().sum();
            let mut t: f64 = cost.layer_work[a..b].iter().sum();
            if i == 0 {
                w += cost.starter_weight_bytes;
                t += cost.starter_work;
            }
            let kv = cost.kv_bytes_per_token * kv_tokens * *size as u64;
            if w + kv > nodes[i].memory_budget {
                continue 'outer;
            }
            worst = worst.max(t / nodes[i].speed);
            a = b;
        }
        best = Some(best.map_or(worst, |b: f64| b.min(worst)));
    }
    best
}

#[test]
fn plans_are_contiguous_within_budget_and_optimal() {
    let mut rng = Rng::new(7);
    let mut feasible = 0;
    for case in 0..400 {
        let layers = 1 + (rng.next_u64() % 8) as usize;
        let n = 1 + (rng.next_u64() % layers.min(4) as u64) as usize;
        let cost = random_cost(&mut rng, layers);
        let nodes: Vec<NodeProfile> = (0..n)
            .map(|_| {
                NodeProfile::new(
                    500 + rng.next_u64() % 4000,
                    0.5 + (rng.next_u64() % 4) as f64,
                )
            })
            .collect();
        let kv_tokens = rng.next_u64() % 50;
        let expected = brute_force(&cost, &nodes, kv_tokens);
        match (plan(&cost, &nodes, kv_tokens), expected) {
            (Ok(p), Some(best)) => {
                feasible += 1;
                assert_eq!(p.nodes.len(), n);
                assert_eq!(p.nodes[0].layers.start, 0, "case {case}");
                assert_eq!(p.nodes[n - 1].layers.end, layers);
                for w in p.nodes.windows(2) {
                    assert_eq!(w[0].layers.end, w[1].layers.start, "contiguous");
                }
                for (a, node) in p.nodes.iter().zip(&nodes) {
                    assert!(!a.layers.is_empty());
                    assert!(a.weight_bytes + a.kv_bytes <= node.memory_budget);
                }
                assert!(
                    (p.bottleneck - best).abs() <= 1e-9 * best.max(1.0),
                    "case {case}"
                );
                let worst = p
                    .nodes
                    .iter()
                    .map(|a| a.seconds_per_token)
                    .fold(0.0, f64::max);
                assert!((worst - p.bottleneck).abs() <= 1e-12 * worst.max(1.0));
            }
            (Err(e), None) => assert!(e.to_string().contains("does not fit"), "{e}"),
            (Ok(p), None) => panic!("case {case}: planned {p:?} but nothing fits"),
            (Err(e), Some(b)) => panic!("case {case}: {e} but {b} is possible"),
        }
    }
    assert!(
        feasible > 100,
        "enough feasible cases exercised: {feasible}"
    );
}

#[test]
fn faster_nodes_get_more_layers_and_errors_are_clear() {
    let cost = ModelCost {
        layer_weight_bytes: vec![10; 12],
        kv_bytes_per_token: 0,
        layer_work: vec![1.0; 12],
        starter_weight_bytes: 0,
        starter_work: 0.0,
    };
    let fast = NodeProfile::new(1000, 3.0);
    let slow = NodeProfile::new(1000, 1.0);
    let p = plan(&cost, &[slow, fast], 0).unwrap();
    assert_eq!(p.nodes[0].layers, 0..3);
    assert_eq!(p.nodes[1].layers, 3..12);

    let e = plan(&cost, &[slow; 13], 0).unwrap_err().to_string();
    assert!(e.contains("13 nodes") && e.contains("12 layers"), "{e}");
    let tiny = NodeProfile::new(50, 1.0);
    let e = plan(&cost, &[tiny, tiny], 0).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn default_model_costs_come_from_its_tensors() -> anyhow::Result<()> {
    let model = mdi_tests::default_model()?;
    let cost = ModelCost::from_store(model.store.as_ref(), &model.config)?;
    assert_eq!(cost.n_layers(), 30);
    // All of the file's tensor data is weights: the plan accounts for every byte.
    let file_len = std::fs::metadata(&model.path)?.len();
    assert!(cost.total_weight_bytes() <= file_len);
    assert!(cost.total_weight_bytes() > file_len * 97 / 100);
    let node = NodeProfile::new(1 << 30, 1.0);
    let p = plan(&cost, &[node; 3], 2 * 8192)?;
    let per_node_cap = cost.total_weight_bytes() / 3 + cost.total_weight_bytes() / 20;
    for a in &p.nodes[1..] {
        assert!(a.weight_bytes <= per_node_cap, "{a:?}");
    }
    Ok(())
}
