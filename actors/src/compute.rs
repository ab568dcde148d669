//! Tensor work on sync actors: one `SyncArbiter` thread pool for device heads
//! and one for worker tails. Each thread owns its own copy of the network
//! (tch modules are Send but not Sync); the async event loop never touches a
//! tensor.
//!
//! Messages in: `RunHead` (one input), `RunTail` (a batch of activations).
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

/// One compute thread's network.
pub struct Executor {
    net: EarlyExitNet,
    // Keeps the variables alive; the network's layers read them.
    _vs: tch::nn::VarStore,
}

impl Actor for Executor {
    type Context = SyncContext<Self>;
}

impl Executor {
    /// Starts `threads` executors. The model is loaded once here to fail
    /// fast with a clear error; each thread then loads its own copy.
    pub fn start(spec: ModelSpec, threads: usize) -> Result<Addr<Executor>, ActorError> {
        load_model(&spec.weights, spec.device)?;
        let spec = Arc::new(spec);
        Ok(SyncArbiter::start(threads.max(1), move || {
            // libtorch's intra-op thread count is per calling thread (an
            // OpenMP setting): without this each pool thread would fan every
            // small forward out to all cores and fight its siblings.
            tch::set_num_threads(1);
            let m = load_model(&spec.weights, spec.device).expect("model loaded once already at start");
            Executor { net: m.net, _vs: m.vs }
        }))
    }
}

/// Runs `head(partition_branch)` on one input [C, H, W] (flattened).
#[derive(Message)]
#[rtype(result = "Result<HeadOutput, ActorError>")]
pub struct RunHead {
    pub partition_branch: usize,
    pub input: Arc<[f32]>,
}

#[derive(Debug, Clone)]
pub struct HeadOutput {
    pub branch_logits: Vec<f32>,
    /// The activation, flattened, without the batch dimension.
    pub activation: Vec<f32>,
    pub activation_shape: Vec<i64>,
    pub compute: Duration,
}

impl Handler<RunHead> for Executor {
    type Result = Result<HeadOutput, ActorError>;

    fn handle(&mut self, msg: RunHead, _: &mut SyncContext<Self>) -> Self::Result {
        let started = Instant::now();
        let dims = self.net.architecture().input.dims();
        let want = (dims[0] * dims[1] * dims[2]) as usize;
        if msg.input.len() != want {
            return Err(ActorError::Invalid {
                what: "input".into(),
                reason: format!("{} values, the model takes {dims:?} = {want}", msg.input.len()),
            });
        }
        let x = Tensor::from_slice(&msg.input).view([1, dims[0], dims[1], dims[2]]).to_device(self.net.device());
        let (logits, act) = self.net.head(msg.partition_branch, &x)?;
        let activation_shape = act.size()[1..].to_vec();
        Ok(HeadOutput {
            branch_logits: to_vec(&logits)?,
            activation: to_vec(&act)?,
            activation_shape,
            compute: started.elapsed(),
        })
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
        let x = Tensor::from_slice(&msg.activations).view(dims.as_slice()).to_device(self.net.device());
        let logits = self.net.tail(msg.partition_branch, &x)?;
        let (conf, class) = logits.softmax(-1, Kind::Float).max_dim(1, false);
        let conf: Vec<f32> = to_vec(&conf)?;
        let class: Vec<i64> = Vec::try_from(class.to_device(Device::Cpu)).map_err(branchpoint_models::ModelError::from)?;
        Ok(TailOutput {
            answers: class.into_iter().map(|c| c as u32).zip(conf).collect(),
            compute: started.elapsed(),
        })
    }
}

impl Executor {
    fn activation_shape(&self, branch: usize) -> Result<Vec<i64>, ActorError> {
        self.net.check_branch(branch)?;
        Ok(self.net.architecture().partition_points[branch - 1].activation_shape.clone())
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ActorError> {
    Ok(Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(branchpoint_models::ModelError::from)?)
}
