//! Benchmark: temperature fitting on the 5,000 validation inputs and the full
//! offloading sweep once logits exist, on the shipped model.
//!
//!     cargo bench -p branchpoint --bench calibration
//!
//! Logits are computed once (not timed); each measurement is the median of
//! repeated runs. Results go in BENCHMARKS.md.
use std::path::Path;
use std::time::Instant;

use branchpoint::evaluation::{method_report, split_logits, SweepSettings};
use branchpoint_core::calibration::{fit, Method};
use branchpoint_core::offload::{default_p_tars, LatencyModel};
use branchpoint_models::Model;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    // Before any thread exists: libtorch's intra-op threads inherit it.
    branchpoint_models::subnormal::flush_subnormals();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for name in ["balexnet-fmnist", "bvgg-fmnist"] {
        println!("model models/{name}.safetensors");
        bench(&root.join(format!("models/{name}.safetensors")));
    }
}

fn bench(weights: &Path) {
    let model = Model::load(weights, tch::Device::Cpu).expect("shipped model");
    let data = model.load_data(None).expect("dataset installed by scripts/setup.sh");
    let logits = split_logits(&model, &data).expect("logits");
    let names = model.exit_names();
    let n_val = logits.validation[0].len();

    let per_branch = median_ms(21, || {
        fit(Method::PerBranch, &logits.validation).unwrap();
    });
    let global = median_ms(21, || {
        fit(Method::Global, &logits.validation).unwrap();
    });
    let latency: Vec<LatencyModel> =
        model.partition_points().iter().map(|p| LatencyModel { head_ms: 0.4, tail_ms: 1.0, activation_bytes: p.activation_bytes, uplink_mbit_s: 10.0, rtt_ms: 20.0 }).collect();
    let p_tars = default_p_tars();
    let settings = SweepSettings { p_tars: &p_tars, outage_batch: 100, latency: &latency, deadline_ms: 40.0, deadline_curve_p_tar: 0.9 };
    let temps = fit(Method::PerBranch, &logits.validation).unwrap();
    let sweep = median_ms(11, || {
        for m in [Method::Uncalibrated, Method::Global, Method::PerBranch] {
            method_report(m, String::new(), &temps, &logits, &names, &settings).unwrap();
        }
    });
    // Every calibration method per exit (the cross-validated choice fits
    // each twice more), then certified thresholds for 14 targets per branch.
    let methods = median_ms(5, || {
        for e in &logits.validation {
            for m in branchpoint_core::recalibration::METHODS {
                branchpoint_core::recalibration::ConfidenceMap::fit(m, e).unwrap();
            }
            branchpoint_core::recalibration::select(e, 1).unwrap();
        }
    });
    let grid = branchpoint_core::risk::default_grid();
    let certify = median_ms(11, || {
        for e in &logits.validation[..logits.validation.len() - 1] {
            let t = branchpoint_core::calibration::fit_temperature(&[e]).unwrap();
            let counts = branchpoint_core::risk::ConfidenceCounts::of_exit(e, t).unwrap();
            for &a in &p_tars {
                branchpoint_core::risk::certify(&counts, branchpoint_core::risk::Target { accuracy: a, delta: 0.05 }, &grid).unwrap();
            }
        }
    });
    // The batch certificate (a batch the size of the test set) computes the
    // stricter error rate for every exit count it meets.
    let batch = logits.test[0].len();
    let certify_batch = median_ms(11, || {
        for e in &logits.validation[..logits.validation.len() - 1] {
            let t = branchpoint_core::calibration::fit_temperature(&[e]).unwrap();
            let counts = branchpoint_core::risk::ConfidenceCounts::of_exit(e, t).unwrap();
            for &a in &p_tars {
                branchpoint_core::risk::certify_batch(&counts, branchpoint_core::risk::Target { accuracy: a, delta: 0.05 }, batch, &grid).unwrap();
            }
        }
    });
    // Certified for the plan chosen: every branch's thresholds on the
    // fine plan grid at once, from the confidences (temperatures given, as
    // a refit hands them over), population and batch promise.
    let plan_grid = branchpoint_core::guarantee::plan_grid();
    let temperatures: Vec<f64> = logits.validation[..logits.validation.len() - 1].iter().map(|e| branchpoint_core::calibration::fit_temperature(&[e]).unwrap()).collect();
    let plans = |promise| {
        median_ms(11, || {
            let counts: Vec<_> =
                logits.validation[..temperatures.len()].iter().zip(&temperatures).map(|(e, &t)| branchpoint_core::risk::ConfidenceCounts::of_exit(e, t).unwrap()).collect();
            let target = branchpoint_core::risk::Target { accuracy: 0.95, delta: 0.05 };
            branchpoint_core::guarantee::certify_plans(&counts, target, promise, branchpoint_core::guarantee::Correction::FixedSequenceUnion, &plan_grid).unwrap();
        })
    };
    let (plans_population, plans_batch) = (plans(branchpoint_core::guarantee::Promise::Population), plans(branchpoint_core::guarantee::Promise::Batch(batch)));
    println!("validation inputs: {n_val}, test inputs: {}, exits: {}", logits.test[0].len(), names.len());
    println!("fit per-branch TS (one T per exit, {} fits):      median {per_branch:8.2} ms", names.len());
    println!("fit global TS (one T, all exits' logits pooled):    median {global:8.2} ms");
    println!("full evaluation (3 methods x {} branches x {} p_tar, per-exit metrics, deadline curves): median {sweep:8.2} ms", latency.len(), p_tars.len());
    println!("every calibration method ({}) fit on every exit, plus the cross-validated choice: median {methods:8.2} ms", branchpoint_core::recalibration::METHODS.join(", "));
    println!(
        "certified thresholds for {} targets on each of {} branches (temperature fit included): median {certify:8.2} ms; together {:.2} ms (target: under 1 s)",
        p_tars.len(),
        logits.validation.len() - 1,
        methods + certify
    );
    println!(
        "batch-certified thresholds (batch of {batch} inputs), the same targets and branches: median {certify_batch:8.2} ms; with the methods {:.2} ms (target: under 1 s)",
        methods + certify_batch
    );
    println!(
        "every branch's thresholds on the plan grid ({} thresholds x {} branches) certified at once on {n_val} inputs: population median {plans_population:8.2} ms, batch {plans_batch:8.2} ms (target: under 50 ms)",
        plan_grid.len(),
        temperatures.len()
    );
}
