//! Benchmarks of the live system (issue: device and cloud-worker actors):
//!
//!     cargo bench -p branchpoint --bench system
//!
//! 1. Device decision path at batch 1 (an `Infer` message to a device actor,
//!    head forward on the device's thread, calibrated decision, outcome to
//!    the collector) vs a bare tch forward of the same head and branch, with
//!    its logits read back: ratio of medians. Once for the built-in model,
//!    once for the imported example (`models/mobilenet-ee-fmnist.json`,
//!    whose bare head is the TorchScript module itself).
//! 2. Worker throughput with dynamic batching (requests flooding the
//!    batcher, max batch 32) vs a bare batched tail forward at batch 32:
//!    ratio of inputs per second.
//! 3. Offload round trip over loopback NATS to a real worker at a paced
//!    1,000 requests/s, with the worker's queueing and compute subtracted:
//!    p50 and p99.
//! 4. One process running 1,000 device actors: sustained inputs/s and
//!    resident memory.
//! 5. Subnormals: the batched tail (branch 2, batch 32) on real activations
//!    of test inputs vs the same activations with every subnormal flushed,
//!    and vs the same with a tenth of their values made subnormal (what a
//!    device that does not flush could send), all on a thread that flushes;
//!    and the last once more on a thread that does not, to show what the
//!    flush saves on this CPU.
//!
//! Each comparison is measured in the same run, on the same machine.
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use branchpoint_actors::collector::{Collector, GetSummary};
use branchpoint_actors::compute::{Executor, LoadedNet, ModelSpec};
use branchpoint_actors::device::{Device, DeviceConfig, Infer};
use branchpoint_actors::fleet::{run_fleet, DeviceThreads, FleetConfig, TestInputs};
use branchpoint_actors::offload::{Activation, Offload};
use branchpoint_actors::transport::OffloadLink;
use branchpoint_actors::worker::nats::serve_nats;
use branchpoint_actors::worker::{Batcher, Job, ReplyTo, ServedModel, WorkerConfig};
use branchpoint_messages::{Codec, Deadline, OffloadReply, PartitionBranch, Tensor as WireTensor};
use branchpoint_models::Model;
use tch::Tensor;

fn branch2_request(seq: usize, activation: &WireTensor, budget_us: u64) -> Offload {
    // As the worker's NATS edge takes it: f32 as values, others encoded.
    let shape = activation.shape.clone();
    let activation = match activation.dtype {
        branchpoint_messages::DType::F32 => Activation::F32(activation.to_f32_vec().expect("an f32 tensor").into()),
        _ => Activation::Encoded(std::sync::Arc::new(activation.clone())),
    };
    Offload {
        device_id: "bench".into(),
        seq: seq as u64,
        partition_branch: 2,
        shape,
        activation,
        deadline: Deadline { sent_at_unix_us: 0, budget_us },
        audit: None,
        model_sha256: None,
    }
}

/// Medians (bare head forward, device decision path) in us of `runs`
/// inputs of `model` at partition branch 1. The two are interleaved input
/// by input, so both see the same machine load (run one after the other,
/// they differed by up to 30 % on this shared machine, either way round).
fn decision_path(system: &actix::SystemRunner, model: &Path, runs: usize) -> (f64, f64) {
    let loaded = Model::load(model, tch::Device::Cpu).expect("shipped model");
    let data = loaded.load_data(None).unwrap();
    let inputs = Arc::new(TestInputs::from_split(&data.test).unwrap());
    let (points, sha, dims, exits) = (loaded.partition_points().to_vec(), loaded.sha256().to_string(), loaded.input().dims(), loaded.num_exits());
    drop(loaded);
    let spec = ModelSpec { model: model.to_path_buf(), device: tch::Device::Cpu };
    let (bare, actor): (Vec<f64>, Vec<f64>) = system.block_on(async move {
        // The device lives on this thread, as on a real device; p_tar is
        // low enough that every input exits (the offload path is [3]).
        let net = std::rc::Rc::new(LoadedNet::load(&spec).unwrap());
        let collector = Collector::new(exits - 1).start();
        let wexec = Executor::start(vec![spec.clone()], 1).unwrap();
        let wcfg = WorkerConfig { worker_id: "unused".into(), max_batch: 1, max_wait: Duration::from_millis(1) };
        let link = OffloadLink::InProcess(Batcher::new(wcfg, wexec, vec![ServedModel { model_sha256: sha.clone(), partition_points: points }]).with_compute_threads(1).start());
        let cfg = DeviceConfig {
            id: "bench".into(),
            partition_branch: PartitionBranch::FIRST,
            p_tar: 0.1,
            temperatures: vec![1.3; exits],
            deadline: Duration::from_secs(1),
            model_sha256: sha.as_str().into(),
            codec: Codec::F32,
            emulation: None,
            interrupt: Default::default(),
            audit: None,
        };
        let device = Device::new(cfg, net.clone(), link, collector.clone()).start();
        let (mut bare, mut actor) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for i in 0..runs {
            let k = i % 1000;
            let t = Instant::now();
            let x = Tensor::from_slice(&inputs.images[k]).view([1, dims[0], dims[1], dims[2]]);
            let (logits, _act) = net.net().head(1, &x).unwrap();
            let _ = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
            bare.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            let arrived = Instant::now();
            device.send(Infer { arrival: i as u64, arrived, input_index: k, input: inputs.images[k].clone(), label: inputs.labels[k] }).await.unwrap();
            actor.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let s = collector.send(GetSummary).await.unwrap();
        assert_eq!((s.outcomes, s.decided_on_device), (runs, runs), "every input decided on the device");
        (bare, actor)
    });
    (median(bare), median(actor))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0;
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let weights = root.join("models/balexnet-fmnist.safetensors");
    let model = Model::load(&weights, tch::Device::Cpu).expect("shipped model");
    let data = model.load_data(None).unwrap();
    let inputs = Arc::new(TestInputs::from_split(&data.test).unwrap());
    let points = model.partition_points().to_vec();
    let sha = model.sha256().to_string();
    let spec = ModelSpec { model: weights.clone(), device: tch::Device::Cpu };
    println!("torch threads per compute thread: 1; machine: {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()));

    // 1. Decision path vs bare head forward, batch 1, branch 1: the
    // built-in model, then the imported example (its head is TorchScript).
    let system = actix::System::new();
    for (label, path) in [("built-in", weights.clone()), ("imported", root.join("models/mobilenet-ee-fmnist.json"))] {
        let (b, a) = decision_path(&system, &path, 3000);
        println!(
            "[1] decision path, batch 1, branch 1, {label} {}: bare head forward median {b:.1} us; device decision path median {a:.1} us; ratio {:.3}",
            path.file_name().unwrap().to_string_lossy(),
            a / b
        );
    }

    // 2. Worker throughput with dynamic batching vs bare batched tail, batch 32, branch 2.
    let (batch, batches) = (32usize, 100usize);
    let act_shape = &points[1].activation_shape;
    let per: usize = act_shape.iter().product::<i64>() as usize;
    let one_act: Vec<f32> = (0..per).map(|i| ((i % 17) as f32) * 0.1).collect();
    let mut dims = vec![batch as i64];
    dims.extend(act_shape);
    let xb = Tensor::from_slice(&one_act.repeat(batch)).view(dims.as_slice());
    let _ = model.tail(2, &xb).unwrap();
    // Rounds of 10 bare batches, then 10 batches' worth of requests through
    // the worker under each codec in turn, so all see the same machine
    // load. The ratio is taken per round (the bare batches' time over the
    // worker's, in the same round) and its median reported: a neighbour's
    // burst then moves one round, not the figure. The worker decodes f16
    // and int8 activations into its batch; the bare tail gets f32 values.
    let rounds = 2 * batches / 10;
    let (bare_secs, worker_secs) = system.block_on({
        let sha = sha.clone();
        let (spec, points, one_act, act_shape) = (spec.clone(), points.clone(), one_act.clone(), act_shape.clone());
        let net = &model;
        let xb = &xb;
        async move {
            let mut shape = vec![1u32];
            shape.extend(act_shape.iter().map(|&d| d as u32));
            let mut workers = Vec::new();
            for codec in Codec::ALL {
                let exec = Executor::start(vec![spec.clone()], 1).unwrap();
                let cfg = WorkerConfig { worker_id: "bench".into(), max_batch: batch, max_wait: Duration::from_millis(5) };
                let batcher = Batcher::new(cfg, exec, vec![ServedModel { model_sha256: sha.clone(), partition_points: points.clone() }]).with_compute_threads(1).start();
                workers.push((batcher, codec.encode(&shape, &one_act).unwrap()));
            }
            let (mut bare, mut worker) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
            for round in 0..rounds {
                let t = Instant::now();
                for _ in 0..10 {
                    let y = net.tail(2, xb).unwrap();
                    let _ = y.softmax(-1, tch::Kind::Float).max_dim(1, false);
                }
                bare.push(t.elapsed().as_secs_f64());
                // Each round starts with another codec: the worker run right
                // after the bare batches measured lower in every round.
                for j in 0..workers.len() {
                    let i = (round + j) % workers.len();
                    let (batcher, tensor) = &workers[i];
                    let n = batch * 10;
                    let t = Instant::now();
                    let mut waits = Vec::with_capacity(n);
                    for seq in 0..n {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let request = branch2_request(seq, tensor, 60_000_000);
                        batcher.send(Job { request, received: Instant::now(), reply: ReplyTo::Local(tx) }).await.unwrap();
                        waits.push(rx);
                    }
                    for w in waits {
                        assert!(matches!(w.await.unwrap(), OffloadReply::Answer(_)));
                    }
                    worker[i].push(t.elapsed().as_secs_f64());
                }
            }
            (bare, worker)
        }
    });
    let total = (batch * 10 * rounds) as f64;
    let bare_ips = total / bare_secs.iter().sum::<f64>();
    for (codec, secs) in Codec::ALL.iter().zip(worker_secs) {
        let worker_ips = total / secs.iter().sum::<f64>();
        let ratios: Vec<f64> = bare_secs.iter().zip(&secs).map(|(b, w)| b / w).collect();
        let (lo, hi) = (ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(0.0, f64::max));
        println!(
            "[2] worker throughput, branch 2 tail, batch {batch}, {codec} activations: bare batched forward {bare_ips:.0} inputs/s; worker with dynamic batching {worker_ips:.0} inputs/s; ratio of the totals {:.3}; median ratio over {rounds} rounds {:.3} (from {lo:.3} to {hi:.3})",
            worker_ips / bare_ips,
            pct(ratios, 0.5)
        );
    }

    // 3. Offload round trip over loopback NATS at 1,000 requests/s, worker compute excluded.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(root.join(".venv/bin/nats-server"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server from scripts/setup.sh");
    let listening = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < listening, "nats-server did not listen on {port} within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let (overhead, rtts, sent) = system.block_on({
        let sha = sha.clone();
        let (spec, points, one_act, act_shape) = (spec.clone(), points.clone(), one_act.clone(), act_shape.clone());
        async move {
            let wclient = async_nats::connect(&url).await.unwrap();
            let exec = Executor::start(vec![spec], 1).unwrap();
            let cfg = WorkerConfig { worker_id: "bench".into(), max_batch: 32, max_wait: Duration::from_micros(500) };
            let batcher = Batcher::new(cfg, exec, vec![ServedModel { model_sha256: sha.clone(), partition_points: points }]).with_compute_threads(1).start();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            actix::spawn(async move {
                let ready = move || {
                    let _ = ready_tx.send(());
                };
                let _ = serve_nats(wclient, batcher, "bench".into(), ready, std::future::pending()).await;
            });
            ready_rx.await.unwrap();
            let client = async_nats::connect(&url).await.unwrap();
            let link = OffloadLink::Nats(client);
            let mut shape = vec![1u32];
            shape.extend(act_shape.iter().map(|&d| d as u32));
            let tensor = WireTensor::from_f32(&shape, &one_act).unwrap();
            let n = 3000;
            let start = Instant::now();
            let mut handles = Vec::with_capacity(n);
            for seq in 0..n {
                tokio::time::sleep_until(tokio::time::Instant::from_std(start + Duration::from_micros(1000 * seq as u64))).await;
                let link = link.clone();
                let request = branch2_request(seq, &tensor, 5_000_000);
                handles.push(actix::spawn(async move {
                    let t = Instant::now();
                    let a = link.offload(request, Duration::from_secs(5)).await.expect("answer");
                    let rtt = t.elapsed().as_secs_f64() * 1e6;
                    (rtt, rtt - (a.answer.timings.queue_us + a.answer.timings.compute_us) as f64)
                }));
            }
            let mut rtts = Vec::new();
            let mut over = Vec::new();
            for h in handles {
                let (r, o) = h.await.unwrap();
                rtts.push(r);
                over.push(o);
            }
            (over, rtts, n as f64 / start.elapsed().as_secs_f64())
        }
    });
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "[3] offload over loopback NATS at {sent:.0} requests/s, {} bytes per activation: round trip minus worker queueing and compute p50 {:.0} us, p99 {:.0} us (whole round trip p50 {:.0} us, p99 {:.0} us)",
        one_act.len() * 4,
        pct(overhead.clone(), 0.5),
        pct(overhead, 0.99),
        pct(rtts.clone(), 0.5),
        pct(rtts, 0.99)
    );

    // 4. 1,000 device actors in one process, in-process worker.
    let (summary, secs) = system.block_on({
        let sha = sha.clone();
        let (spec, points, inputs) = (spec.clone(), points.clone(), inputs.clone());
        async move {
            let mut device_threads = DeviceThreads::start(spec.clone(), 1).unwrap();
            let wexec = Executor::start(vec![spec], 1).unwrap();
            let cfg = WorkerConfig { worker_id: "embedded".into(), max_batch: 32, max_wait: Duration::from_millis(2) };
            let link = OffloadLink::InProcess(Batcher::new(cfg, wexec, vec![ServedModel { model_sha256: sha.clone(), partition_points: points }]).with_compute_threads(1).start());
            let collector = Collector::new(2).start();
            let fleet = FleetConfig {
                devices: 1000,
                rate_per_device: 1.0,
                duration: Duration::from_secs(10),
                max_inputs: None,
                seed: 1,
                device: DeviceConfig {
                    id: "d".into(),
                    partition_branch: PartitionBranch::FIRST,
                    p_tar: 0.9,
                    temperatures: vec![1.0; 3],
                    deadline: Duration::from_secs(1),
                    model_sha256: sha.as_str().into(),
                    codec: Codec::F32,
                    emulation: None,
                    interrupt: Default::default(),
                    audit: None,
                },
                drain: Duration::from_secs(3),
                group: "default".into(),
                model_sha256: sha.clone(),
                fleet_id: "bench".into(),
                status_interval: None,
                stop_grace: Duration::ZERO,
            };
            let t = Instant::now();
            let run = run_fleet(fleet, inputs, &device_threads, link, collector, None, || (), std::future::pending()).await.unwrap();
            let secs = t.elapsed().as_secs_f64();
            // Joined: no head may still run while the process exits.
            device_threads.shutdown();
            (run.summary, secs)
        }
    });
    let (rss, hwm) = rss_mib();
    println!(
        "[4] 1,000 device actors, offered 1,000 inputs/s for 10 s: {} inputs, {} outcomes in {secs:.1} s = {:.0} inputs/s sustained; latency p50 {:.1} ms, p99 {:.1} ms; fallbacks {}; resident memory now {rss:.0} MiB, peak {hwm:.0} MiB (whole benchmark process)",
        summary.inputs,
        summary.outcomes,
        summary.outcomes as f64 / secs,
        summary.latency_ms_p50,
        summary.latency_ms_p99,
        summary.fallbacks
    );

    // 5. Subnormals in the activations a worker receives.
    let head_inputs = Tensor::from_slice(&inputs.images[..batch].concat()).view([batch as i64, 1, 28, 28]);
    let (_, real) = model.head(2, &head_inputs).unwrap();
    let real = real.contiguous();
    let flushed = {
        let v: Vec<f32> = Vec::try_from(real.flatten(0, -1)).unwrap();
        Tensor::from_slice(&v.iter().map(|x| if x.is_subnormal() { 0.0 } else { *x }).collect::<Vec<f32>>()).view(real.size().as_slice())
    };
    let shape = real.size();
    let laden_values: Vec<f32> = {
        // Every tenth value becomes a subnormal of its sign (set by bits:
        // arithmetic would flush it on this thread).
        let v: Vec<f32> = Vec::try_from(real.flatten(0, -1)).unwrap();
        v.iter().enumerate().map(|(i, x)| if i % 10 == 0 { f32::from_bits((x.to_bits() & 0x8000_0000) | 0x0000_4000) } else { *x }).collect()
    };
    let laden = Tensor::from_slice(&laden_values).view(shape.as_slice());
    let subnormals = |t: &Tensor| branchpoint_models::subnormal::count(t);
    let tail_ms = |x: &Tensor, reps: usize| {
        let t = Instant::now();
        for _ in 0..reps {
            let y = model.tail(2, x).unwrap();
            let _ = Vec::<f32>::try_from(y.flatten(0, -1)).unwrap();
        }
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..30 {
        a.push(tail_ms(&real, 5));
        b.push(tail_ms(&flushed, 5));
        c.push(tail_ms(&laden, 5));
    }
    let (a, b, c) = (median(a), median(b), median(c));
    // The same laden batch on a thread that keeps subnormals (libtorch's
    // default): what every worker thread paid before it flushed.
    let unflushed = {
        let (spec, shape) = (spec.clone(), shape.clone());
        std::thread::spawn(move || {
            let net = LoadedNet::load(&spec).unwrap();
            // After the load, which turns flushing on for its thread.
            branchpoint_models::subnormal::set_flush_subnormals(false);
            tch::set_num_threads(1);
            let x = Tensor::from_slice(&laden_values).view(shape.as_slice());
            let v: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..2 {
                        let y = net.net().tail(2, &x).unwrap();
                        let _ = Vec::<f32>::try_from(y.flatten(0, -1)).unwrap();
                    }
                    t.elapsed().as_secs_f64() * 1e3 / 2.0
                })
                .collect();
            median(v)
        })
        .join()
        .unwrap()
    };
    println!(
        "[5] subnormals, branch 2 tail, batch {batch}: real activations ({} subnormal of {}) {a:.2} ms; every subnormal flushed {b:.2} ms; ratio {:.3}; a tenth made subnormal ({}) {c:.2} ms, ratio {:.3}; the same on a thread that does not flush {unflushed:.2} ms, {:.1}x",
        subnormals(&real),
        real.numel(),
        a / b,
        subnormals(&laden),
        c / b,
        unflushed / b
    );
}
