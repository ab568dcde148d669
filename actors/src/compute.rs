//! Tensor work. Each thread that touches tensors owns its own copy of the
//! network (`LoadedNet`; tch modules are Send but not Sync):
//! - device threads (see `fleet::DeviceThreads`) run heads inline, inside the
//!   device actor's handler, so an input's decision costs no thread hop;
//! - cloud workers run tails on a `SyncArbiter` pool of `Executor`s, so the
//!   batcher's event loop never blocks on a forward.
//!
//! Executor messages in: `RunTail` (a batch of activations).
//! Mailbox: actix's default bound for sync actors (16 per thread); senders
//! await `send`, so a busy pool slows its callers instead of growing a queue.
//! Restart: a thread that panics is replaced by the arbiter with a freshly
//! loaded network. Shutdown: threads end when the last address is dropped.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use branchpoint_models::{load_model, EarlyExitNet};
use tch::{Device, Kind, Tensor};

use crate::error::ActorError;

/// What a pool thread needs to load its own copy of the model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub weights: PathBuf,
    pub device: Device,
}

/// One thread's copy of the network.
pub struct LoadedNet {
    net: EarlyExitNet,
    // Keeps the variables alive; the network's layers read them.
    _vs: tch::nn::VarStore,
}

impl LoadedNet {
    pub fn load(spec: &ModelSpec) -> Result<Self, ActorError> {
        let m = load_model(&spec.weights, spec.device)?;
        Ok(Self { net: m.net, _vs: m.vs })
    }

    pub fn net(&self) -> &EarlyExitNet {
        &self.net
    }

    /// Runs `head(partition_branch)` on one input [C, H, W] (flattened).
    pub fn run_head(&self, partition_branch: usize, input: &[f32]) -> Result<HeadOutput, ActorError> {
        let started = Instant::now();
        let dims = self.net.architecture().input.dims();
        let want = (dims[0] * dims[1] * dims[2]) as usize;
        if input.len() != want {
            return Err(ActorError::Invalid {
                what: "input".into(),
                reason: format!("{} values, the model takes {dims:?} = {want}", input.len()),
            });
        }
        let x = Tensor::from_slice(input).view([1, dims[0], dims[1], dims[2]]).to_device(self.net.device());
        let (logits, activation) = self.net.head(partition_branch, &x)?;
        Ok(HeadOutput { branch_logits: to_vec(&logits)?, activation, compute: started.elapsed() })
    }
}

/// One tail-pool thread.
pub struct Executor {
    net: LoadedNet,
    /// Emulates slower cloud hardware: each tail holds its thread this many
    /// times as long as it took here (1: this machine as it is).
    slowdown: f64,
}

impl Actor for Executor {
    type Context = SyncContext<Self>;
}

impl Executor {
    /// Starts `threads` executors. The model is loaded once here to fail
    /// fast with a clear error; each thread then loads its own copy.
    pub fn start(spec: ModelSpec, threads: usize) -> Result<Addr<Executor>, ActorError> {
        Self::start_with_slowdown(spec, threads, 1.0)
    }

    /// `start`, on emulated hardware `slowdown` times slower than this
    /// machine: the thread stays busy for the difference, as a slower CPU
    /// would, so queues and batching react to it like to real load.
    pub fn start_with_slowdown(spec: ModelSpec, threads: usize, slowdown: f64) -> Result<Addr<Executor>, ActorError> {
        if !(slowdown.is_finite() && slowdown >= 1.0) {
            return Err(ActorError::Invalid { what: "cloud slowdown".into(), reason: format!("{slowdown} must be a number at least 1") });
        }
        load_model(&spec.weights, spec.device)?;
        let spec = Arc::new(spec);
        Ok(SyncArbiter::start(threads.max(1), move || {
            // libtorch's intra-op thread count is per calling thread (an
            // OpenMP setting): without this each pool thread would fan every
            // small forward out to all cores and fight its siblings.
            tch::set_num_threads(1);
            Executor { net: LoadedNet::load(&spec).expect("model loaded once already at start"), slowdown }
        }))
    }
}

pub struct HeadOutput {
    pub branch_logits: Vec<f32>,
    /// The activation [1, ...], left as a tensor: it is copied out only for
    /// an input that is offloaded.
    pub activation: Tensor,
    pub compute: Duration,
}

impl HeadOutput {
    /// The activation as a wire tensor, batch dimension included.
    pub fn wire_activation(&self) -> Result<branchpoint_messages::Tensor, ActorError> {
        let shape: Vec<u32> = self.activation.size().iter().map(|&d| d as u32).collect();
        Ok(branchpoint_messages::Tensor::from_f32(&shape, &to_vec(&self.activation)?)?)
    }
}

/// Runs `tail(partition_branch)` on `batch` activations laid end to end.
#[derive(Message)]
#[rtype(result = "Result<TailOutput, ActorError>")]
pub struct RunTail {
    pub partition_branch: usize,
    pub batch: usize,
    pub activations: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TailOutput {
    /// (predicted class, max softmax probability) per input, in order.
    pub answers: Vec<(u32, f32)>,
    pub compute: Duration,
}

impl Handler<RunTail> for Executor {
    type Result = Result<TailOutput, ActorError>;

    fn handle(&mut self, msg: RunTail, _: &mut SyncContext<Self>) -> Self::Result {
        let started = Instant::now();
        let shape = self.activation_shape(msg.partition_branch)?;
        let per_input: i64 = shape.iter().product();
        if msg.activations.len() as i64 != per_input * msg.batch as i64 {
            return Err(ActorError::Invalid {
                what: "activation batch".into(),
                reason: format!("{} values for {} inputs of shape {shape:?}", msg.activations.len(), msg.batch),
            });
        }
        let mut dims = vec![msg.batch as i64];
        dims.extend(&shape);
        let net = &self.net.net;
        let x = Tensor::from_slice(&msg.activations).view(dims.as_slice()).to_device(net.device());
        let logits = net.tail(msg.partition_branch, &x)?;
        let (conf, class) = logits.softmax(-1, Kind::Float).max_dim(1, false);
        let conf: Vec<f32> = to_vec(&conf)?;
        let class: Vec<i64> = Vec::try_from(class.to_device(Device::Cpu)).map_err(branchpoint_models::ModelError::from)?;
        if self.slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(self.slowdown - 1.0));
        }
        Ok(TailOutput {
            answers: class.into_iter().map(|c| c as u32).zip(conf).collect(),
            compute: started.elapsed(),
        })
    }
}

impl Executor {
    fn activation_shape(&self, branch: usize) -> Result<Vec<i64>, ActorError> {
        self.net.net.check_branch(branch)?;
        Ok(self.net.net.architecture().partition_points[branch - 1].activation_shape.clone())
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ActorError> {
    Ok(Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(branchpoint_models::ModelError::from)?)
}
