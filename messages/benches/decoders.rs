//! Every decoder on hostile bytes, as many cases as asked (default 10^7):
//! valid messages of every type with bits flipped, bytes overwritten with
//! MessagePack markers and huge lengths, truncated, spliced or extended,
//! and plain random bytes. Nothing may panic; a panic prints the bytes
//! that caused it and fails the run.
//!
//!     cargo bench -p branchpoint-messages --bench decoders -- 10000000
//!
//! (A coverage-guided fuzzer needs a nightly toolchain, which this
//! project's machines do not have; this is the stable stand-in.)
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use branchpoint_messages::*;

/// SplitMix64: seeded, the same cases on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn samples() -> Vec<Vec<u8>> {
    let sha = "ab".repeat(32);
    let activation = Tensor::from_f32(&[1, 2, 3], &[0.5; 6]).unwrap();
    let tag = AuditTag {
        model_sha256: sha.clone(),
        group: "g".into(),
        branch_logits: vec![1.0, 2.0, 0.5],
        on_device: true,
        sampled: true,
        audit_rate: 0.1,
        p_tar: 0.9,
        target_accuracy: 0.9,
        decided_at_unix_us: 5,
        label: Some(1),
    };
    let request = OffloadRequest {
        device_id: "d-1".into(),
        seq: 7,
        partition_branch: 1,
        activation,
        deadline: Deadline { sent_at_unix_us: 1, budget_us: 1000 },
        audit: Some(tag.clone()),
        model_sha256: None,
    };
    let timings = WorkerTimings { queue_us: 1, compute_us: 2, batch_size: 3 };
    let watch = BranchWatch {
        group: "g".into(),
        partition_branch: 1,
        target_accuracy: 0.9,
        temperature: 1.2,
        threshold: 0.8,
        audits: 10,
        offloads: 20,
        edge_agreement: Some(0.95),
        edge_agreement_low: Some(0.9),
        edge_agreement_high: Some(0.99),
        offload_rate: Some(0.4),
        ece: Some(0.02),
        alarms: 1,
        refits: 1,
        edge_accuracy: Some(0.93),
        edge_accuracy_low: Some(0.9),
        edge_accuracy_high: Some(0.96),
        reliability: vec![ReliabilityBin { confidence: 0.9, agreement: 0.85, weight: 3.0 }],
        auto_refit: true,
        last_refit: Some(RefitSummary { at_unix_us: 9, decided_at_unix_us: 8, temperature: 1.5, threshold: 0.85, fit_inputs: 100, certify_inputs: 100 }),
        stale: 2,
    };
    let summary =
        FleetSummary { inputs: 10, outcomes: 10, decided_on_device: 5, offloaded: 5, answered_by_cloud: 5, per_exit: vec![5, 5], accuracy: 0.9, ..FleetSummary::default() };
    vec![
        encode(&request).unwrap(),
        // An int8 activation: scales and zero points to corrupt too.
        encode(&OffloadRequest { activation: branchpoint_messages::Codec::Int8.encode(&[1, 2, 3], &[0.5, 1.0, 0.0, 2.0, 3.0, 4.0]).unwrap(), ..request.clone() }).unwrap(),
        encode(&OffloadReply::Answer(OffloadAnswer { seq: 7, worker_id: "w".into(), class: 3, confidence: 0.9, timings })).unwrap(),
        encode(&OffloadReply::Error(ErrorReply { seq: Some(7), worker_id: "w".into(), kind: ErrorKind::Overloaded, detail: "busy".into() })).unwrap(),
        encode(&CalibrationUpdate { model_sha256: sha.clone(), method: CalibrationMethod::PerBranch, temperatures: vec![1.0, 1.5, 2.0], group: Some("g".into()) }).unwrap(),
        encode(&PlanUpdate {
            target: PlanTarget::Group("g".into()),
            partition_branch: 2,
            p_tar: 0.8,
            certified: Some(CertifiedTarget { accuracy: 0.9, delta: 0.05 }),
            codec: Some(branchpoint_messages::Codec::Int8),
            temperature: Some(1.5),
        })
        .unwrap(),
        encode(&CertifyRequest { partition_branch: 1, target: CertifiedTarget { accuracy: 0.9, delta: 0.05 } }).unwrap(),
        encode(&CalibrationRefit { method: CalibrationMethod::Global }).unwrap(),
        encode(&tag.result("d-1", 1, 2)).unwrap(),
        encode(&CalibrationStatus { model_sha256: sha, at_unix_us: 1, refused: 0, watched: vec![watch], alarms_total: 1, refits_total: 1 }).unwrap(),
        encode(&WorkerStatus {
            worker_id: "w".into(),
            queue_depth: 1,
            batches_served: 2,
            mean_batch_size: 3.0,
            queue_delay_us_ewma: 4.0,
            at_unix_us: 5,
            requests: 6,
            errors: 1,
            queue_delay_us_interval: 7.0,
            batch_size_interval: 2.0,
        })
        .unwrap(),
        encode(&FleetStatus {
            fleet_id: "f".into(),
            group: "g".into(),
            devices: 2,
            running: true,
            at_unix_us: 2_000_000,
            started_unix_us: 1,
            summary,
            latency_le_ms: vec![1.0, 2.0],
            latency_le_counts: vec![5, 10],
            latency_sum_ms: 12.0,
            applied: vec![AppliedPlan { partition_branch: 1, p_tar: 0.9, temperature: 1.0, devices: 2 }],
        })
        .unwrap(),
    ]
}

/// Bytes that MessagePack gives meaning to: never-used, nil, containers
/// and strings with 32-bit lengths, extension types.
const MARKERS: [u8; 12] = [0xc1, 0xc0, 0xdc, 0xdd, 0xde, 0xdf, 0xdb, 0xc6, 0xc9, 0xd4, 0xcf, 0x7f];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].clone();
    match rng.below(6) {
        0 => {
            for _ in 0..=rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            for _ in 0..=rng.below(3) {
                let i = rng.below(b.len());
                b[i] = MARKERS[rng.below(MARKERS.len())];
                // A huge length after a 32-bit-length marker.
                for j in 1..5 {
                    if i + j < b.len() {
                        b[i + j] = 0xff;
                    }
                }
            }
        }
        2 => b.truncate(rng.below(b.len())),
        3 => {
            let other = &seeds[rng.below(seeds.len())];
            let (i, j) = (rng.below(b.len()), rng.below(other.len()));
            b.truncate(i);
            b.extend_from_slice(&other[j..]);
        }
        4 => {
            let extra = rng.below(16);
            for _ in 0..extra {
                let v = rng.next() as u8;
                b.insert(rng.below(b.len() + 1), v);
            }
        }
        _ => {
            let n = rng.below(64);
            b = (0..n).map(|_| rng.next() as u8).collect();
        }
    }
    b
}

fn decode_all(bytes: &[u8]) -> usize {
    [
        decode::<OffloadRequest>(bytes).is_ok(),
        decode::<OffloadReply>(bytes).is_ok(),
        decode::<CalibrationUpdate>(bytes).is_ok(),
        decode::<PlanUpdate>(bytes).is_ok(),
        decode::<NetworkReport>(bytes).is_ok(),
        decode::<WorkerStatus>(bytes).is_ok(),
        decode::<FleetStatus>(bytes).is_ok(),
        decode::<CertifyRequest>(bytes).is_ok(),
        decode::<CertifyReply>(bytes).is_ok(),
        decode::<CalibrationRefit>(bytes).is_ok(),
        decode::<AuditResult>(bytes).is_ok(),
        decode::<CalibrationStatus>(bytes).is_ok(),
        decode_seq(bytes).is_some(),
    ]
    .iter()
    .filter(|ok| **ok)
    .count()
}

fn main() {
    // `cargo bench` passes `--bench`; the first number is the case count.
    let cases: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000_000);
    let seeds = samples();
    for s in &seeds {
        assert!(decode_all(s) >= 1, "every seed decodes as its own type");
    }
    let mut rng = Rng(2021);
    let started = Instant::now();
    let mut decoded = 0u64;
    for i in 0..cases {
        let bytes = mutate(&mut rng, &seeds);
        match catch_unwind(AssertUnwindSafe(|| decode_all(&bytes))) {
            Ok(n) => decoded += n as u64,
            Err(_) => {
                eprintln!("case {i}: a decoder panicked on {bytes:02x?}");
                std::process::exit(1);
            }
        }
    }
    let s = started.elapsed().as_secs_f64();
    println!("decoders: {cases} hostile inputs x 13 decoders, no panic; {decoded} decodes succeeded; {:.1} s ({:.0} inputs/s)", s, cases as f64 / s);
}
