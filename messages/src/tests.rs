//! Tests of the codec and validation: property tests for round trips and
//! hostile input, unit tests for each rule the wire promises.

use proptest::prelude::*;
use serde::Serialize;

use crate::wire::encode_unvalidated;
use crate::*;
use MessageError as E;

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (prop::collection::vec(1u32..5, 1..5), 0usize..3).prop_flat_map(|(shape, codec)| {
        let n = shape.iter().product::<u32>() as usize;
        prop::collection::vec(-1e3f32..1e3, n).prop_map(move |values| crate::Codec::ALL[codec].encode(&shape, &values).unwrap())
    })
}

// prop_compose! keeps each generator next to the fields it fills.
prop_compose! {
    fn request()(device_id in id(), seq: u64, partition_branch in 1u8.., activation in tensor(),
                 sent_at_unix_us: u64, budget_us in 1u64..) -> OffloadRequest {
        let deadline = Deadline { sent_at_unix_us, budget_us };
        OffloadRequest { device_id, seq, partition_branch, activation, deadline, audit: None, model_sha256: None }
    }
}

prop_compose! {
    fn answer()(seq: u64, worker_id in id(), class: u32, confidence in 0f32..=1.0,
                queue_us: u64, compute_us: u64, batch_size: u32) -> OffloadReply {
        let timings = WorkerTimings { queue_us, compute_us, batch_size };
        OffloadReply::Answer(OffloadAnswer { seq, worker_id, class, confidence, timings })
    }
}

const ERROR_KINDS: [ErrorKind; 6] = {
    use ErrorKind::*;
    [DeadlineExpired, Overloaded, InvalidRequest, UnsupportedVersion, UnknownBranch, Internal]
};

prop_compose! {
    fn error_reply()(seq: Option<u64>, worker_id in id(), detail in ".{0,40}",
                     kind in prop::sample::select(&ERROR_KINDS[..])) -> OffloadReply {
        OffloadReply::Error(ErrorReply { seq, worker_id, kind, detail })
    }
}

prop_compose! {
    fn calibration()(model_sha256 in "[0-9a-f]{64}", which in 0u8..3,
                     temperatures in prop::collection::vec(1e-3f64..100.0, 1..6),
                     group in proptest::option::of(id()))
                     -> CalibrationUpdate {
        use CalibrationMethod::*;
        let method = [Uncalibrated, Global, PerBranch][which as usize];
        CalibrationUpdate { model_sha256, method, temperatures, group }
    }
}

prop_compose! {
    fn plan()(id in id(), group: bool, partition_branch in 1u8.., p_tar in 1e-6f64..0.999,
              certified in proptest::option::of((0.01f64..0.999, 0.001f64..0.5)),
              codec in proptest::option::of(0usize..3))
              -> PlanUpdate {
        let target = if group { PlanTarget::Group(id) } else { PlanTarget::Device(id) };
        let certified = certified.map(|(accuracy, delta)| CertifiedTarget { accuracy, delta });
        PlanUpdate { target, partition_branch, p_tar, certified, codec: codec.map(|c| crate::Codec::ALL[c]), temperature: None }
    }
}

prop_compose! {
    fn network()(device_id in id(), uplink_bytes_per_s_ewma in 0f64..1e10, rtt_us_ewma in 0f64..1e8,
                 start: u32, len in 0u64..1 << 40, samples: u32) -> NetworkReport {
        let (window_start_unix_us, window_end_unix_us) = (u64::from(start), u64::from(start) + len);
        NetworkReport {
            device_id, uplink_bytes_per_s_ewma, rtt_us_ewma,
            window_start_unix_us, window_end_unix_us, samples,
            group: (samples % 2 == 0).then(|| "phones".into()),
            us_per_byte_conservative: (samples % 3 == 0).then_some(f64::from(samples) / 7.0),
            response_us_conservative: (samples % 5 == 0).then_some(f64::from(samples) * 3.0),
            deadline_us: (samples % 7 == 0).then_some(u64::from(samples)),
            arrival_rate: (samples % 11 == 0).then_some(f64::from(samples) / 3.0),
        }
    }
}

prop_compose! {
    fn worker_status()(worker_id in id(), queue_depth: u32, batches in 0u64..1_000_000,
                       mean_batch_size in 0f64..256.0, queue_delay_us_ewma in 0f64..1e7,
                       at_unix_us: u64, extra in 0u64..1_000_000,
                       queue_delay_us_interval in 0f64..1e7) -> WorkerStatus {
        let requests = batches + extra;
        WorkerStatus {
            worker_id, queue_depth, batches_served: batches,
            mean_batch_size, queue_delay_us_ewma, at_unix_us,
            requests, errors: requests / 7, queue_delay_us_interval,
            batch_size_interval: mean_batch_size / 2.0,
        }
    }
}

prop_compose! {
    fn fleet_status()(fleet_id in id(), group in id(), devices in 1u32..=100_000, running: bool,
                      inputs in 0usize..1_000_000, p_tar in 0f64..=1.0,
                      counts in proptest::collection::vec(0u64..1000, 0..12)) -> FleetStatus {
        let summary = FleetSummary {
            inputs, outcomes: inputs, decided_on_device: inputs / 2, offloaded: inputs - inputs / 2,
            answered_by_cloud: inputs - inputs / 2, per_exit: vec![inputs / 2, inputs - inputs / 2],
            accuracy: 0.5, edge_accuracy: (inputs % 2 == 0).then_some(0.25), deadline_misses: inputs / 3, ..FleetSummary::default()
        };
        // Cumulative, and no more than the outcomes.
        let mut counts = counts;
        counts.sort_unstable();
        let counts: Vec<u64> = counts.into_iter().map(|c| c.min(inputs as u64)).collect();
        FleetStatus {
            fleet_id, group, devices, running, at_unix_us: 100_000_007, started_unix_us: 3, summary,
            latency_le_ms: counts.iter().map(|&c| c as f64 + 0.5).collect(),
            latency_le_counts: counts, latency_sum_ms: 12.5,
            applied: vec![AppliedPlan { partition_branch: 1, p_tar, temperature: 1.5, devices }],
        }
    }
}

fn roundtrip<M: Message + PartialEq + std::fmt::Debug>(msg: &M) -> Result<(), TestCaseError> {
    let bytes = encode(msg).unwrap();
    prop_assert_eq!(&decode::<M>(&bytes).unwrap(), msg);
    // Every strict prefix is an incomplete message and must be refused.
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        prop_assert!(decode::<M>(&bytes[..cut]).is_err());
    }
    Ok(())
}

prop_compose! {
    fn certify()(partition_branch in 1u8.., accuracy in 0.01f64..0.999, delta in 0.001f64..0.5) -> CertifyRequest {
        CertifyRequest { partition_branch, target: CertifiedTarget { accuracy, delta } }
    }
}

prop_compose! {
    fn certify_reply()(model_sha256 in "[0-9a-f]{64}", temperature in 1e-3f64..100.0, req in certify(),
                       threshold in proptest::option::of(0f64..=1.0), inputs in 0u32..100_000,
                       exits_frac in 0f64..=1.0, errors_frac in 0f64..=1.0, error_upper_bound in 0f64..=1.0)
                       -> CertifyReply {
        let exits = (f64::from(inputs) * exits_frac) as u32;
        let errors = (f64::from(exits) * errors_frac) as u32;
        CertifyReply { model_sha256, temperature, partition_branch: req.partition_branch, target: req.target, threshold, inputs, exits, errors, error_upper_bound }
    }
}

prop_compose! {
    fn audit()(model_sha256 in "[0-9a-f]{64}", device_id in id(), group in id(), partition_branch in 1u8.., decided_at_unix_us: u64,
               branch_logits in prop::collection::vec(-50f32..50.0, 2..12), pick: prop::sample::Index, on_device: bool, coin: bool,
               audit_rate in 0.001f64..=1.0, labelled: bool, y: prop::sample::Index) -> AuditResult {
        let final_class = pick.index(branch_logits.len()) as u32;
        let label = labelled.then(|| y.index(branch_logits.len()) as u32);
        AuditResult { model_sha256, device_id, group, partition_branch, decided_at_unix_us, branch_logits, final_class, on_device, sampled: on_device || coin, audit_rate, p_tar: 0.9, target_accuracy: 0.9, label }
    }
}

prop_compose! {
    fn calibration_status()(model_sha256 in "[0-9a-f]{64}", at_unix_us: u64, refused: u64, group in id(), partition_branch in 1u8..,
                            audits: u32, offloads: u32, est in proptest::option::of(0f64..=1.0), alarms: u64, refits: u64,
                            bins in prop::collection::vec((0f64..=1.0, 0f64..=1.0, 0f64..1e6), 0..15), auto_refit: bool,
                            refit_at in proptest::option::of(any::<u64>()), stale: u64) -> CalibrationStatus {
        let watch = BranchWatch {
            group, partition_branch, target_accuracy: 0.9, temperature: 1.5, threshold: 0.8, audits, offloads,
            edge_agreement: est, edge_agreement_low: est.map(|e| e * 0.9), edge_agreement_high: est.map(|e| (e * 1.1).min(1.0)),
            offload_rate: est, ece: est, alarms, refits,
            edge_accuracy: est, edge_accuracy_low: est.map(|e| e * 0.8), edge_accuracy_high: est,
            reliability: bins.into_iter().map(|(confidence, agreement, weight)| ReliabilityBin { confidence, agreement, weight }).collect(),
            auto_refit, stale,
            last_refit: refit_at.map(|at| RefitSummary { at_unix_us: at, decided_at_unix_us: at / 2, temperature: 1.7, threshold: 0.85, fit_inputs: 400, certify_inputs: 400 }),
        };
        CalibrationStatus { model_sha256, at_unix_us, refused, watched: vec![watch], alarms_total: alarms, refits_total: refits }
    }
}

/// Decodes `bytes` as every message type and counts the successes.
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
        decode::<AuditResult>(bytes).is_ok(),
        decode::<CalibrationStatus>(bytes).is_ok(),
    ]
    .iter()
    .filter(|ok| **ok)
    .count()
}

/// Asserts that `$result` is an `Err` matching `$pattern`.
macro_rules! assert_refused {
    ($result:expr, $pattern:pat) => {
        match $result {
            Err($pattern) => {}
            other => panic!("expected {}, got {other:?}", stringify!($pattern)),
        }
    };
}

proptest! {
    #[test]
    fn encoded_len_is_the_length_of_the_encoding(req in request(), st in fleet_status()) {
        prop_assert_eq!(encoded_len(&req).unwrap(), encode(&req).unwrap().len());
        prop_assert_eq!(encoded_len(&st).unwrap(), encode(&st).unwrap().len());
    }

    #[test]
    fn every_message_round_trips(
        req in request(), rep in prop_oneof![answer(), error_reply()], cal in calibration(),
        pl in plan(), net in network(), ws in worker_status(), fs in fleet_status(),
        cq in certify(), cr in certify_reply(), au in audit(), cs in calibration_status(),
    ) {
        roundtrip(&au)?;
        roundtrip(&cs)?;
        roundtrip(&cq)?;
        roundtrip(&cr)?;
        roundtrip(&req)?;
        roundtrip(&rep)?;
        roundtrip(&cal)?;
        roundtrip(&pl)?;
        roundtrip(&net)?;
        roundtrip(&ws)?;
        roundtrip(&fs)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        prop_assert_eq!(decode_all(&bytes), 0);
    }

    #[test]
    fn corrupted_messages_never_panic(
        req in request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = encode(&req).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        decode_all(&bytes);
    }

    #[test]
    fn wrong_byte_length_is_refused(mut req in request(), extra in 1usize..9, shorter: bool) {
        let data = &mut req.activation.data;
        match shorter {
            true => data.truncate(data.len().saturating_sub(extra)),
            false => data.extend(std::iter::repeat_n(0u8, extra)),
        }
        assert_refused!(req.activation.validate(), E::SizeMismatch { .. });
        assert_refused!(req.activation.to_f32_vec(), E::SizeMismatch { .. });
        let bytes = encode_unvalidated(&req, WIRE_VERSION).unwrap();
        assert_refused!(decode::<OffloadRequest>(&bytes), E::SizeMismatch { .. });
    }
}

fn sample_request() -> OffloadRequest {
    let activation = Tensor::from_f32(&[1, 2, 2], &[0.5, -1.0, 2.0, 3.25]).unwrap();
    let deadline = Deadline { sent_at_unix_us: 1_700_000_000_000_000, budget_us: 50_000 };
    OffloadRequest { device_id: "dev-1".into(), seq: 7, partition_branch: 2, activation, deadline, audit: None, model_sha256: None }
}

#[test]
fn unknown_fields_are_ignored() {
    // What a newer peer might send: extra fields in the envelope and in the body.
    #[derive(Serialize)]
    struct FutureReport {
        #[serde(flatten)]
        known: NetworkReport,
        radio: &'static str,
        signal_dbm: Vec<i32>,
    }
    #[derive(Serialize)]
    struct FutureEnvelope {
        trace_id: u64,
        wire_version: u16,
        body: FutureReport,
    }
    let known = NetworkReport {
        device_id: "dev-1".into(),
        uplink_bytes_per_s_ewma: 1e6,
        rtt_us_ewma: 2e4,
        window_start_unix_us: 10,
        window_end_unix_us: 20,
        samples: 3,
        group: None,
        us_per_byte_conservative: None,
        response_us_conservative: None,
        deadline_us: None,
        arrival_rate: None,
    };
    let body = FutureReport { known: known.clone(), radio: "lte", signal_dbm: vec![-80, -90] };
    let envelope = FutureEnvelope { trace_id: 9, wire_version: WIRE_VERSION, body };
    let bytes = rmp_serde::to_vec_named(&envelope).unwrap();
    assert_eq!(decode::<NetworkReport>(&bytes), Ok(known));
}

#[test]
fn wrong_version_is_refused_naming_both() {
    let bytes = encode_unvalidated(&sample_request(), WIRE_VERSION + 1).unwrap();
    let err = decode::<OffloadRequest>(&bytes).unwrap_err();
    assert_eq!(err, E::VersionMismatch { got: WIRE_VERSION + 1, expected: WIRE_VERSION });
    let text = err.to_string();
    let (got, ours) = (format!("version {}", WIRE_VERSION + 1), format!("version {WIRE_VERSION}"));
    assert!(text.contains(&got) && text.contains(&ours), "{text}");
}

#[test]
fn non_finite_activation_is_refused() {
    assert_refused!(Tensor::from_f32(&[2], &[1.0, f32::NAN]), E::NonFinite { index: 1, .. });
    // Beyond f16's range a value becomes infinite, which is refused too.
    assert_refused!(Tensor::from_f32_as_f16(&[1], &[1e6]), E::NonFinite { index: 0, .. });
    let mut req = sample_request();
    req.activation.data[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_refused!(encode(&req), E::NonFinite { index: 1, .. });
    let bytes = encode_unvalidated(&req, WIRE_VERSION).unwrap();
    assert_refused!(decode::<OffloadRequest>(&bytes), E::NonFinite { index: 1, .. });
}

#[test]
fn f16_round_trip_within_f16_precision() {
    let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.731).collect();
    let t = Tensor::from_f32_as_f16(&[10, 100], &values).unwrap();
    assert_eq!(t.data.len(), 2000);
    for (a, b) in values.iter().zip(t.to_f32_vec().unwrap()) {
        // f16 has an 11-bit significand: relative rounding error <= 2^-11.
        assert!((a - b).abs() <= a.abs() * 2f32.powi(-11), "{a} vs {b}");
    }
    let exact = Tensor::from_f32(&[3], &[1.5, -2.0, 1e-30]).unwrap();
    assert_eq!(exact.to_f32_vec().unwrap(), vec![1.5, -2.0, 1e-30]);
}

#[test]
fn tensor_travels_as_bytes_not_numbers() {
    let mut req = sample_request();
    req.activation = Tensor::from_f32(&[1000], &[0.1; 1000]).unwrap();
    // An array of f32 would cost 5 bytes per element; bin costs 4 plus a header.
    assert!(encode(&req).unwrap().len() < 4000 + 200);
}

/// Tensor data is MessagePack bin: the same bytes as an array of integers
/// or as a string are refused, not converted; and a request refused for
/// its content still says its seq.
#[test]
fn tensor_data_is_bin_only_and_a_refused_request_keeps_its_seq() {
    #[derive(Serialize)]
    struct Loose<D: Serialize> {
        dtype: DType,
        shape: Vec<u32>,
        data: D,
    }
    #[derive(Serialize)]
    struct Req<D: Serialize> {
        device_id: String,
        seq: u64,
        partition_branch: u8,
        activation: Loose<D>,
        deadline: Deadline,
    }
    #[derive(Serialize)]
    struct Env<B> {
        wire_version: u16,
        body: B,
    }
    let deadline = Deadline { sent_at_unix_us: 1, budget_us: 1000 };
    let req = |data| Env {
        wire_version: WIRE_VERSION,
        body: Req { device_id: "d".into(), seq: 42, partition_branch: 1, activation: Loose { dtype: DType::F32, shape: vec![1], data }, deadline },
    };
    let as_ints = rmp_serde::to_vec_named(&req(vec![0u8, 0, 128, 63])).unwrap();
    assert!(matches!(decode::<OffloadRequest>(&as_ints), Err(E::Decode(_))), "an array of integers is not bytes");
    let text = Env {
        wire_version: WIRE_VERSION,
        body: Req { device_id: "d".into(), seq: 42, partition_branch: 1, activation: Loose { dtype: DType::F32, shape: vec![1], data: "abcd" }, deadline },
    };
    assert!(matches!(decode::<OffloadRequest>(&rmp_serde::to_vec_named(&text).unwrap()), Err(E::Decode(_))), "a string is not bytes");
    // The bin form decodes.
    let bin = Env {
        wire_version: WIRE_VERSION,
        body: Req {
            device_id: "d".into(),
            seq: 42,
            partition_branch: 1,
            activation: Loose { dtype: DType::F32, shape: vec![1], data: serde_bytes::ByteBuf::from(vec![0u8, 0, 128, 63]) },
            deadline,
        },
    };
    let ok = decode::<OffloadRequest>(&rmp_serde::to_vec_named(&bin).unwrap()).unwrap();
    assert_eq!(ok.activation.to_f32_vec().unwrap(), vec![1.0]);
    // Refused, but the seq is readable.
    assert_eq!(decode_seq(&as_ints), Some(42));
    assert_eq!(decode_seq(b"not msgpack"), None);
}

#[test]
fn missing_deadline_is_refused() {
    let mut req = sample_request();
    req.deadline = Deadline::default();
    let bytes = encode_unvalidated(&req, WIRE_VERSION).unwrap();
    assert_eq!(decode::<OffloadRequest>(&bytes), Err(E::MissingDeadline));
    // A sender that leaves the field out entirely gets the same error.
    #[derive(Serialize)]
    struct NoDeadline {
        device_id: String,
        seq: u64,
        partition_branch: u8,
        activation: Tensor,
    }
    let OffloadRequest { device_id, seq, partition_branch, activation, .. } = req;
    let old = NoDeadline { device_id, seq, partition_branch, activation };
    let bytes = encode_unvalidated(&old, WIRE_VERSION).unwrap();
    assert_eq!(decode::<OffloadRequest>(&bytes), Err(E::MissingDeadline));
}

#[test]
fn ranges_are_checked() {
    let plan = |partition_branch, p_tar| PlanUpdate { target: PlanTarget::Group("lab".into()), partition_branch, p_tar, certified: None, codec: None, temperature: None };
    let certified = |accuracy, delta| PlanUpdate { certified: Some(CertifiedTarget { accuracy, delta }), ..plan(1, 0.6) };
    assert!(certified(0.95, 0.05).validate().is_ok());
    let request = |partition_branch, accuracy, delta| CertifyRequest { partition_branch, target: CertifiedTarget { accuracy, delta } };
    assert!(request(2, 0.95, 0.05).validate().is_ok());
    assert_refused!(request(0, 0.95, 0.05).validate(), E::PartitionBranch(0));
    for (a, d) in [(1.0, 0.05), (0.95, 0.0), (0.0, 0.1), (0.9, f64::NAN)] {
        assert_refused!(certified(a, d).validate(), E::OutOfRange { .. });
        assert_refused!(request(1, a, d).validate(), E::OutOfRange { .. });
    }
    let reply = CertifyReply {
        model_sha256: "ab".repeat(32),
        temperature: 1.5,
        partition_branch: 1,
        target: CertifiedTarget { accuracy: 0.95, delta: 0.05 },
        threshold: Some(0.7),
        inputs: 5000,
        exits: 4000,
        errors: 150,
        error_upper_bound: 0.042,
    };
    assert!(reply.validate().is_ok());
    assert_eq!((reply.p_tar(), CertifyReply { threshold: None, ..reply.clone() }.p_tar()), (0.7, 1.0), "nothing certified: offload all");
    assert_refused!(CertifyReply { threshold: Some(1.5), ..reply.clone() }.validate(), E::PTar(_));
    assert_refused!(CertifyReply { exits: 5001, ..reply.clone() }.validate(), E::OutOfRange { .. });
    assert_refused!(CertifyReply { errors: 4001, ..reply.clone() }.validate(), E::OutOfRange { .. });
    assert_refused!(CertifyReply { temperature: 0.0, ..reply.clone() }.validate(), E::OutOfRange { .. });
    assert_refused!(CertifyReply { model_sha256: "xyz".into(), ..reply }.validate(), E::BadSha256(_));
    // Audit results: the logits, the class and the coin must make sense.
    let audit = AuditResult {
        model_sha256: "ab".repeat(32),
        device_id: "cam-1".into(),
        group: "cameras".into(),
        partition_branch: 1,
        decided_at_unix_us: 1,
        branch_logits: vec![1.0, 0.5, -2.0],
        final_class: 2,
        on_device: true,
        sampled: true,
        audit_rate: 0.1,
        p_tar: 0.8,
        target_accuracy: 0.9,
        label: Some(1),
    };
    assert!(audit.validate().is_ok());
    assert!(AuditResult { label: None, ..audit.clone() }.validate().is_ok());
    assert_refused!(AuditResult { label: Some(3), ..audit.clone() }.validate(), E::OutOfRange { field: "label", .. });
    assert_refused!(AuditResult { final_class: 3, ..audit.clone() }.validate(), E::OutOfRange { field: "final_class", .. });
    assert_refused!(AuditResult { branch_logits: vec![1.0, f32::NAN], final_class: 0, ..audit.clone() }.validate(), E::OutOfRange { field: "branch_logits", .. });
    assert_refused!(AuditResult { branch_logits: vec![1.0], final_class: 0, ..audit.clone() }.validate(), E::OutOfRange { field: "branch_logits", .. });
    assert_refused!(AuditResult { branch_logits: vec![0.0; MAX_AUDIT_CLASSES + 1], final_class: 0, ..audit.clone() }.validate(), E::OutOfRange { .. });
    assert_refused!(AuditResult { sampled: false, ..audit.clone() }.validate(), E::OutOfRange { field: "sampled", .. });
    assert_refused!(AuditResult { audit_rate: 0.0, ..audit.clone() }.validate(), E::OutOfRange { field: "audit_rate", .. });
    assert_refused!(AuditResult { group: "a b".into(), ..audit.clone() }.validate(), E::BadId { .. });
    assert_refused!(AuditResult { p_tar: 1.5, ..audit.clone() }.validate(), E::PTar(_));
    assert_refused!(AuditResult { target_accuracy: 1.0, ..audit.clone() }.validate(), E::OutOfRange { field: "target_accuracy", .. });
    assert_refused!(AuditResult { partition_branch: 0, ..audit }.validate(), E::PartitionBranch(0));
    // A plan from a sender that knows nothing of certificates still decodes,
    // and one without a certificate is encoded as such a sender would.
    #[derive(Serialize)]
    struct OlderPlan {
        target: PlanTarget,
        partition_branch: u8,
        p_tar: f64,
    }
    #[derive(Serialize)]
    struct Envelope<B> {
        wire_version: u16,
        body: B,
    }
    let older = Envelope { wire_version: WIRE_VERSION, body: OlderPlan { target: PlanTarget::Group("lab".into()), partition_branch: 1, p_tar: 0.8 } };
    let bytes = rmp_serde::to_vec_named(&older).unwrap();
    assert_eq!(decode::<PlanUpdate>(&bytes), Ok(plan(1, 0.8)));
    assert_eq!(encode(&plan(1, 0.8)).unwrap(), bytes);
    for p in [0.0, 0.8, 1.0] {
        assert!(plan(1, p).validate().is_ok(), "p_tar {p}: 0 is device only, 1 cloud only");
    }
    assert_eq!(plan(0, 0.8).validate(), Err(E::PartitionBranch(0)));
    for p in [1.5, -0.5, f64::NAN] {
        assert_refused!(plan(1, p).validate(), E::PTar(_));
    }
    let cal = |temperatures: Vec<f64>| CalibrationUpdate { model_sha256: "ab".repeat(32), method: CalibrationMethod::PerBranch, temperatures, group: None };
    assert!(CalibrationUpdate { group: Some("cameras".into()), ..cal(vec![1.0, 1.0]) }.validate().is_ok());
    assert_refused!(CalibrationUpdate { group: Some("a.b".into()), ..cal(vec![1.0, 1.0]) }.validate(), E::BadId { .. });
    assert!(cal(vec![1.2, 0.9, 1.0]).validate().is_ok());
    assert_eq!(cal(vec![]).validate(), Err(E::NoTemperatures));
    // Forged temperatures that once got through: far outside what calibrates.
    for t in [1e-30, 1e300, 5e-324, 1e-4, 2e3] {
        assert_refused!(cal(vec![1.0, t]).validate(), E::Temperature { exit: 2, .. });
    }
    assert!(cal(vec![MIN_TEMPERATURE, MAX_TEMPERATURE]).validate().is_ok());
    assert_refused!(cal(vec![1.0; MAX_EXITS + 1]).validate(), E::OutOfRange { field: "temperatures", .. });
    // Statuses whose figures cannot be: 100,010 devices, 1e12 inputs after
    // ten seconds, more errors than requests.
    let fleet = FleetStatus {
        fleet_id: "f".into(),
        group: "g".into(),
        devices: 10,
        running: true,
        at_unix_us: 11_000_000,
        started_unix_us: 1_000_000,
        summary: FleetSummary { inputs: 100, outcomes: 100, decided_on_device: 100, per_exit: vec![100, 0], accuracy: 0.9, ..FleetSummary::default() },
        latency_le_ms: vec![1.0, 2.0],
        latency_le_counts: vec![50, 100],
        latency_sum_ms: 100.0,
        applied: vec![AppliedPlan { partition_branch: 1, p_tar: 0.9, temperature: 1.0, devices: 10 }],
    };
    assert!(fleet.validate().is_ok());
    assert_refused!(FleetStatus { devices: 100_010, ..fleet.clone() }.validate(), E::OutOfRange { field: "devices", .. });
    let huge = FleetSummary { inputs: 1_000_000_000_000, outcomes: 1_000_000_000_000, ..fleet.summary.clone() };
    assert_refused!(FleetStatus { summary: huge, ..fleet.clone() }.validate(), E::OutOfRange { field: "inputs", .. });
    let more_outcomes = FleetSummary { outcomes: 200, ..fleet.summary.clone() };
    assert_refused!(FleetStatus { summary: more_outcomes, ..fleet.clone() }.validate(), E::OutOfRange { field: "outcomes", .. });
    assert_refused!(FleetStatus { latency_le_counts: vec![100, 50], ..fleet.clone() }.validate(), E::OutOfRange { field: "latency_le_counts", .. });
    assert_refused!(FleetStatus { started_unix_us: 12_000_000, ..fleet.clone() }.validate(), E::OutOfRange { field: "at_unix_us", .. });
    let forged_plan = AppliedPlan { partition_branch: 1, p_tar: 0.9, temperature: 1.0, devices: 11 };
    assert_refused!(FleetStatus { applied: vec![forged_plan], ..fleet }.validate(), E::OutOfRange { field: "applied", .. });
    let worker = WorkerStatus {
        worker_id: "w".into(),
        queue_depth: 3,
        batches_served: 10,
        mean_batch_size: 4.0,
        queue_delay_us_ewma: 100.0,
        at_unix_us: 1,
        requests: 40,
        errors: 2,
        queue_delay_us_interval: 50.0,
        batch_size_interval: 4.0,
    };
    assert!(worker.validate().is_ok());
    assert_refused!(WorkerStatus { errors: 41, ..worker.clone() }.validate(), E::OutOfRange { field: "errors", .. });
    assert_refused!(WorkerStatus { mean_batch_size: 1e9, ..worker.clone() }.validate(), E::OutOfRange { field: "mean_batch_size", .. });
    assert_refused!(WorkerStatus { batches_served: 41, ..worker }.validate(), E::OutOfRange { field: "batches_served", .. });
    assert_eq!(cal(vec![1.0, 0.0]).validate(), Err(E::Temperature { exit: 2, value: 0.0 }));
    assert_refused!(cal(vec![f64::INFINITY]).validate(), E::Temperature { exit: 1, .. });
    let mut bad_sha = cal(vec![1.0]);
    bad_sha.model_sha256 = "AB".repeat(32);
    assert_refused!(bad_sha.validate(), E::BadSha256(_));
    let mut req = sample_request();
    req.device_id = "dev.1".into();
    assert_refused!(encode(&req), E::BadId { what: "device id", .. });
}

#[test]
fn hostile_shapes_and_sizes_are_refused() {
    let t = |shape: Vec<u32>| Tensor { dtype: DType::F32, shape, data: vec![], scale: vec![], zero_point: vec![] };
    assert_refused!(t(vec![]).validate(), E::BadShape { .. });
    assert_refused!(t(vec![1; MAX_DIMS + 1]).validate(), E::BadShape { .. });
    assert_refused!(t(vec![4, 0]).validate(), E::BadShape { .. });
    assert_refused!(t(vec![u32::MAX; 4]).validate(), E::TooLarge { what: "tensor", .. });
    // Deep nesting must end in an error, not a stack overflow.
    assert_eq!(decode_all(&[0x91; 100_000]), 0);
    let huge = vec![0u8; MAX_MESSAGE_BYTES as usize + 1];
    assert_refused!(decode::<WorkerStatus>(&huge), E::TooLarge { what: "message", .. });
}

#[test]
fn unknown_error_kind_decodes_as_unknown() {
    // A newer worker's reply with an error kind this build does not know.
    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum FutureReply {
        Error { seq: Option<u64>, worker_id: &'static str, kind: &'static str, detail: String },
    }
    let reply = FutureReply::Error { seq: None, worker_id: "w1", kind: "gpu_on_fire", detail: "".into() };
    let decoded = decode::<OffloadReply>(&encode_unvalidated(&reply, WIRE_VERSION).unwrap());
    assert!(matches!(decoded, Ok(OffloadReply::Error(ErrorReply { kind: ErrorKind::Unknown, .. }))));
}

#[test]
fn subjects_are_dotted_tokens() {
    assert_eq!(subjects::offload(2), "branchpoint.offload.2");
    assert!(subjects::is_valid_id("edge_01-a"));
    for s in [subjects::CALIBRATION_AUDIT, subjects::CALIBRATION_STATUS, subjects::CALIBRATION_CERTIFY] {
        assert!(s.split('.').all(subjects::is_valid_id), "{s}");
    }
    for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(65)] {
        assert!(!subjects::is_valid_id(bad), "{bad:?}");
    }
}

#[test]
fn an_int8_activation_crosses_the_wire_with_its_scales() {
    let values: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32 - 5.0) * 0.25).collect();
    let activation = crate::Codec::Int8.encode(&[2, 3, 2, 2], &values).unwrap();
    assert_eq!((activation.dtype, activation.scale.len()), (DType::U8, 6));
    let req = OffloadRequest { activation, ..sample_request() };
    let back = decode::<OffloadRequest>(&encode(&req).unwrap()).unwrap();
    assert_eq!(back, req);
    let decoded = back.activation.to_f32_vec().unwrap();
    // Within half a step of each channel's range (widened to hold 0).
    for (group, (sent, got)) in values.chunks(4).zip(decoded.chunks(4)).enumerate() {
        let range = sent.iter().fold(0f32, |m, v| m.max(*v)) - sent.iter().fold(0f32, |m, v| m.min(*v));
        for (a, b) in sent.iter().zip(got) {
            assert!((a - b).abs() <= range / 255.0 * 0.5 + 1e-6, "group {group}: {a} came back as {b}");
        }
    }
    // A f32 request encodes as before: no scale or zero point on the wire.
    let plain = encode(&sample_request()).unwrap();
    let text = String::from_utf8_lossy(&plain);
    assert!(!text.contains("scale") && !text.contains("zero_point"));
}

#[test]
fn a_quantised_tensor_that_does_not_add_up_is_refused() {
    let good = crate::Codec::Int8.encode(&[1, 2, 2, 2], &[0.0, 1.0, 2.0, 3.0, 0.0, -1.0, -2.0, 4.0]).unwrap();
    let bad = |t: Tensor| {
        let req = OffloadRequest { activation: t, ..sample_request() };
        let bytes = encode_unvalidated(&req, WIRE_VERSION).unwrap();
        decode::<OffloadRequest>(&bytes).unwrap_err()
    };
    let quant = |e: E| matches!(e, E::BadQuantisation(_));
    assert!(quant(bad(Tensor { scale: vec![], zero_point: vec![], ..good.clone() })), "u8 without scales");
    assert!(quant(bad(Tensor { zero_point: vec![0], ..good.clone() })), "fewer zero points than scales");
    assert!(quant(bad(Tensor { scale: vec![0.1, 0.1, 0.1], zero_point: vec![0, 0, 0], ..good.clone() })), "3 groups of 8 values");
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY, f32::MAX] {
        let e = bad(Tensor { scale: vec![s, 0.1], ..good.clone() });
        assert!(quant(e.clone()), "scale {s}: {e}");
    }
    let f32_with_scale = Tensor { scale: vec![1.0], zero_point: vec![0], ..Tensor::from_f32(&[1, 2], &[1.0, 2.0]).unwrap() };
    assert!(quant(bad(f32_with_scale)), "a f32 tensor carries no scale");
    let short = Tensor { data: vec![0; 7], ..good };
    assert!(matches!(bad(short), E::SizeMismatch { .. }));
}

/// docs/wire.md, followed by a client that is not branchpoint: raw
/// MessagePack primitives, keys in an order of its own, an int8 activation
/// with two groups, and a field this version does not know.
#[test]
fn an_outside_client_following_docs_wire_md_is_understood() {
    use rmp::encode::*;
    let mut b = Vec::new();
    write_map_len(&mut b, 2).unwrap();
    write_str(&mut b, "body").unwrap();
    write_map_len(&mut b, 7).unwrap();
    write_str(&mut b, "seq").unwrap();
    write_uint(&mut b, 41).unwrap();
    write_str(&mut b, "activation").unwrap();
    write_map_len(&mut b, 5).unwrap();
    write_str(&mut b, "shape").unwrap();
    write_array_len(&mut b, 4).unwrap();
    for d in [1u64, 2, 1, 2] {
        write_uint(&mut b, d).unwrap();
    }
    write_str(&mut b, "zero_point").unwrap();
    write_bin(&mut b, &[0, 10]).unwrap();
    write_str(&mut b, "dtype").unwrap();
    write_str(&mut b, "u8").unwrap();
    write_str(&mut b, "data").unwrap();
    write_bin(&mut b, &[0, 255, 10, 20]).unwrap();
    write_str(&mut b, "scale").unwrap();
    write_array_len(&mut b, 2).unwrap();
    write_f32(&mut b, 0.5).unwrap();
    write_f64(&mut b, 0.25).unwrap();
    write_str(&mut b, "device_id").unwrap();
    write_str(&mut b, "outsider-1").unwrap();
    write_str(&mut b, "partition_branch").unwrap();
    write_uint(&mut b, 1).unwrap();
    write_str(&mut b, "deadline").unwrap();
    write_map_len(&mut b, 2).unwrap();
    write_str(&mut b, "budget_us").unwrap();
    write_uint(&mut b, 50_000).unwrap();
    write_str(&mut b, "sent_at_unix_us").unwrap();
    write_uint(&mut b, 1_700_000_000_000_000).unwrap();
    write_str(&mut b, "model_sha256").unwrap();
    write_str(&mut b, &"ab".repeat(32)).unwrap();
    write_str(&mut b, "radio").unwrap();
    write_str(&mut b, "umts").unwrap();
    write_str(&mut b, "wire_version").unwrap();
    write_uint(&mut b, 2).unwrap();
    let req = decode::<OffloadRequest>(&b).unwrap();
    assert_eq!((req.device_id.as_str(), req.seq, req.partition_branch, req.deadline.budget_us), ("outsider-1", 41, 1, 50_000));
    assert_eq!(req.activation.dtype, DType::U8);
    // Group 0: (0 - 0) * 0.5, (255 - 0) * 0.5; group 1: (10 - 10) * 0.25, (20 - 10) * 0.25.
    assert_eq!(req.activation.to_f32_vec().unwrap(), vec![0.0, 127.5, 0.0, 2.5]);
}
