//! Benchmark of virtual-time scenario replay (issue: partition planner and
//! scenario replay): a 10-minute scenario with 100 devices must replay in
//! under a minute on this machine.
//!
//!     cargo bench -p branchpoint --bench scenario
//!
//! The scenario is scenarios/cellular-trace.toml (the shipped synthetic
//! trace) stretched to 600 s and 100 devices at 10 inputs/s each: 600,000
//! inputs per policy run, 5 policies, 28 fixed-plan runs for the oracle.
//! Reported: the one-off preparation (the model's answers on the test split,
//! calibration, planner statistics) and the replay of all runs.
use std::path::Path;
use std::time::Instant;

use branchpoint::evaluation::split_logits;
use branchpoint::scenario::{self, Scenario};
use branchpoint_models::Model;

fn main() {
    // Before any thread exists: libtorch's intra-op threads inherit it.
    branchpoint_models::subnormal::flush_subnormals();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let path = root.join("scenarios/cellular-trace.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace("duration_s = 140.0", "duration_s = 600.0").replace("devices = 20", "devices = 100");
    let s = Scenario::parse(&text, &path, None).unwrap();
    assert_eq!((s.duration_s, s.groups[0].devices), (600.0, 100), "the scenario was stretched");
    let weights = root.join("models/balexnet-fmnist.safetensors");

    let t = Instant::now();
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get() as i32));
    let model = Model::load(&weights, tch::Device::Cpu).unwrap();
    let data = model.load_data(None).unwrap();
    let logits = split_logits(&model, &data).unwrap();
    let profile = scenario::read_profile(&s, &weights).unwrap();
    let codecs = scenario::codec_answers(&s, &model, &data, &[]).unwrap();
    let prepared = scenario::prepare(&s, &model, &logits.validation, &logits.test, &[], &codecs, &profile).unwrap();
    let prepare_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let runs = scenario::replay(&s, &prepared, &|_, _| ()).unwrap();
    let replay_s = t.elapsed().as_secs_f64();
    let candidates = scenario::oracle_candidates(&s, &prepared).len();
    let per_run = runs[0].arrivals;
    let total_runs = runs.len() - 1 + candidates;
    for r in &runs {
        assert_eq!(r.arrivals, r.outcomes, "{:?}", r.policy);
    }
    println!(
        "virtual-time replay, 600 s x 100 devices x 10 inputs/s: {per_run} inputs per run, {total_runs} runs ({} policies + {candidates} oracle candidates) on {} threads",
        runs.len() - 1,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "prepare (model answers on 10,000 test + 5,000 validation inputs, calibration, planner statistics): {prepare_s:.1} s; replay of all runs: {replay_s:.1} s ({:.2} M inputs/s); total {:.1} s (target: under 60 s)",
        (per_run as f64 * total_runs as f64) / replay_s / 1e6,
        prepare_s + replay_s
    );
}
