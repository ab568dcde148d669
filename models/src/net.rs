//! The early-exit network: an ordered list of stages, a side branch after
//! some of them, and the final exit after the last stage.
//!
//! For a partition branch k (1-based; branch k follows stage
//! `branch_after[k-1]`):
//! - `head(k)` runs the stages up to and including that stage, then branch k,
//!   and gives (branch logits, activation);
//! - `tail(k)` runs the remaining stages and the final exit on that
//!   activation and gives the final logits.
//!
//! The variable names (`stage1/conv1/weight`, `branch2/fc/bias`, ...) depend
//! only on the architecture, never on the cut, so one weights file serves
//! every partition point.
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::data::InputShape;
use crate::error::{ModelError, Result};

/// The architecture `train` builds unless told otherwise (the first
/// shipped model's).
pub const DEFAULT_ARCHITECTURE: &str = "b-alexnet-small";

/// The architectures this build can construct, by the name a model card
/// records; a card naming another is refused.
pub const ARCHITECTURES: [&str; 2] = ["b-alexnet-small", "b-vgg-small"];

/// A human- and machine-readable summary of the network, stored in the model
/// card: what each stage and branch computes and what crosses each cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    pub name: String,
    pub input: InputShape,
    pub num_classes: i64,
    pub stages: Vec<StageSpec>,
    pub branches: Vec<BranchSpec>,
    pub final_exit: Vec<String>,
    pub partition_points: Vec<PartitionPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    pub name: String,
    pub layers: Vec<String>,
    /// Output shape of one input, [C, H, W].
    pub output_shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchSpec {
    /// 1-based branch number, as used by `--branch` and reports.
    pub branch: usize,
    /// 1-based number of the stage this branch follows.
    pub after_stage: usize,
    pub layers: Vec<String>,
}

/// What a device sends the cloud when it offloads at this branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionPoint {
    pub branch: usize,
    /// Shape of one input's activation, [C, H, W].
    pub activation_shape: Vec<i64>,
    /// Bytes of one input's activation as f32.
    pub activation_bytes: usize,
}

impl Architecture {
    pub fn num_branches(&self) -> usize {
        self.branches.len()
    }

    /// Number of exits: the side branches plus the final exit.
    pub fn num_exits(&self) -> usize {
        self.branches.len() + 1
    }

    /// Display names of the exits in order: "branch 1", ..., "final".
    pub fn exit_names(&self) -> Vec<String> {
        exit_names(self.branches.len())
    }
}

/// Display names of the exits of a model with `branches` side branches, in
/// order: "branch 1", ..., "final" (reports and calibration files use them).
pub fn exit_names(branches: usize) -> Vec<String> {
    (1..=branches).map(|k| format!("branch {k}")).chain(std::iter::once("final".to_string())).collect()
}

/// Accumulates a stage (or branch) as layers plus a description, tracking the
/// per-input shape so the architecture summary is computed, not hand-written.
struct Builder<'a> {
    path: nn::Path<'a>,
    seq: nn::SequentialT,
    layers: Vec<String>,
    shape: Vec<i64>,
    convs: usize,
}

impl<'a> Builder<'a> {
    fn new(path: nn::Path<'a>, shape: &[i64]) -> Self {
        Self { path, seq: nn::seq_t(), layers: Vec::new(), shape: shape.to_vec(), convs: 0 }
    }

    /// Convolution (same padding) + batch norm + ReLU.
    fn conv_bn_relu(mut self, out: i64, k: i64) -> Self {
        self.convs += 1;
        let cfg = nn::ConvConfig { padding: k / 2, bias: false, ..Default::default() };
        let conv = nn::conv2d(&self.path / format!("conv{}", self.convs), self.shape[0], out, k, cfg);
        let bn = nn::batch_norm2d(&self.path / format!("bn{}", self.convs), out, Default::default());
        self.layers.push(format!("conv{k}x{k}({}->{out}) + batchnorm + relu", self.shape[0]));
        self.seq = self.seq.add(conv).add(bn).add_fn(|x| x.relu());
        self.shape[0] = out;
        self
    }

    fn max_pool2(mut self) -> Self {
        self.layers.push("maxpool2x2".into());
        self.seq = self.seq.add_fn(|x| x.max_pool2d_default(2));
        self.shape[1] /= 2;
        self.shape[2] /= 2;
        self
    }

    /// Average pooling to a fixed `size` x `size` grid.
    fn avg_pool_to(mut self, size: i64) -> Self {
        self.layers.push(format!("adaptive-avgpool to {size}x{size}"));
        self.seq = self.seq.add_fn(move |x| x.adaptive_avg_pool2d([size, size]));
        self.shape[1] = size;
        self.shape[2] = size;
        self
    }

    fn flatten(mut self) -> Self {
        self.layers.push("flatten".into());
        self.seq = self.seq.add_fn(|x| x.flatten(1, -1));
        self.shape = vec![self.shape.iter().product()];
        self
    }

    fn linear(mut self, name: &str, out: i64) -> Self {
        let lin = nn::linear(&self.path / name, self.shape[0], out, Default::default());
        self.layers.push(format!("linear({}->{out})", self.shape[0]));
        self.seq = self.seq.add(lin);
        self.shape = vec![out];
        self
    }

    fn relu(mut self) -> Self {
        self.layers.push("relu".into());
        self.seq = self.seq.add_fn(|x| x.relu());
        self
    }

    fn dropout(mut self, p: f64) -> Self {
        self.layers.push(format!("dropout({p})"));
        self.seq = self.seq.add_fn_t(move |x, train| x.dropout(p, train));
        self
    }
}

/// An early-exit CNN: stages, side branches after some of them, and the
/// final exit. Two architectures, both sized for 28x28x1 (Fashion-MNIST) and
/// 32x32x3 (CIFAR-10) inputs:
///
/// `b-alexnet-small`, in the spirit of B-AlexNet (BranchyNet):
/// stage1: conv5x5(C->32) maxpool  | branch1: avgpool to 5x5, linear (weak, cheap)
/// stage2: conv3x3(32->64) maxpool | branch2: conv3x3(64->32), linear
/// stage3: 2x conv3x3(->96) maxpool
/// final:  linear(->256) relu dropout linear(->10)
///
/// `b-vgg-small`, deeper and wider, three side branches, no dropout (the
/// kind of network that overfits its training set and grows overconfident):
/// stage1: conv3x3(C->32) maxpool            | branch1: avgpool to 4x4, linear
/// stage2: conv3x3(32->64) maxpool           | branch2: conv3x3(64->32), avgpool to 3x3, linear
/// stage3: 2x conv3x3(->128) maxpool         | branch3: linear
/// stage4: conv3x3(128->256)
/// final:  linear(->512) relu linear(->10)
pub struct EarlyExitNet {
    arch: Architecture,
    stages: Vec<nn::SequentialT>,
    branches: Vec<nn::SequentialT>,
    /// branch_after[b] = 0-based index of the stage that branch b+1 follows.
    branch_after: Vec<usize>,
    final_exit: nn::SequentialT,
    device: Device,
}

impl std::fmt::Debug for EarlyExitNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyExitNet").field("arch", &self.arch.name).field("device", &self.device).finish()
    }
}

impl EarlyExitNet {
    /// Builds the default architecture's variables under `root` (fresh
    /// initialisation; load weights into the VarStore afterwards).
    pub fn new(root: &nn::Path, input: InputShape, num_classes: i64) -> Self {
        Self::build(root, DEFAULT_ARCHITECTURE, input, num_classes).expect("the default architecture exists")
    }

    /// Builds the architecture `name` (one of `ARCHITECTURES`) under `root`.
    pub fn build(root: &nn::Path, name: &str, input: InputShape, num_classes: i64) -> Result<Self> {
        let x = input.dims().to_vec();
        let net = match name {
            "b-alexnet-small" => {
                let s1 = Builder::new(root / "stage1", &x).conv_bn_relu(32, 5).max_pool2();
                // Branch 1 sees a coarse 5x5 summary of stage 1: cheap, and weaker
                // than the deeper exits, so offloading buys accuracy.
                let b1 = Builder::new(root / "branch1", &s1.shape).avg_pool_to(5).flatten().linear("fc", num_classes);
                let s2 = Builder::new(root / "stage2", &s1.shape).conv_bn_relu(64, 3).max_pool2();
                let b2 = Builder::new(root / "branch2", &s2.shape).conv_bn_relu(32, 3).flatten().linear("fc", num_classes);
                let s3 = Builder::new(root / "stage3", &s2.shape).conv_bn_relu(96, 3).conv_bn_relu(96, 3).max_pool2();
                let fin = Builder::new(root / "final", &s3.shape).flatten().linear("fc1", 256).relu().dropout(0.5).linear("fc2", num_classes);
                Self::assemble(root, name, input, num_classes, vec![("stage1", s1), ("stage2", s2), ("stage3", s3)], vec![(0, b1), (1, b2)], fin)
            }
            "b-vgg-small" => {
                let s1 = Builder::new(root / "stage1", &x).conv_bn_relu(32, 3).max_pool2();
                let b1 = Builder::new(root / "branch1", &s1.shape).avg_pool_to(4).flatten().linear("fc", num_classes);
                let s2 = Builder::new(root / "stage2", &s1.shape).conv_bn_relu(64, 3).max_pool2();
                let b2 = Builder::new(root / "branch2", &s2.shape).conv_bn_relu(32, 3).avg_pool_to(3).flatten().linear("fc", num_classes);
                let s3 = Builder::new(root / "stage3", &s2.shape).conv_bn_relu(128, 3).conv_bn_relu(128, 3).max_pool2();
                let b3 = Builder::new(root / "branch3", &s3.shape).flatten().linear("fc", num_classes);
                let s4 = Builder::new(root / "stage4", &s3.shape).conv_bn_relu(256, 3);
                let fin = Builder::new(root / "final", &s4.shape).flatten().linear("fc1", 512).relu().linear("fc2", num_classes);
                Self::assemble(root, name, input, num_classes, vec![("stage1", s1), ("stage2", s2), ("stage3", s3), ("stage4", s4)], vec![(0, b1), (1, b2), (2, b3)], fin)
            }
            other => {
                return Err(ModelError::InvalidArgument { what: "architecture".into(), reason: format!("{other:?} is not one this build knows; use one of {ARCHITECTURES:?}") })
            }
        };
        Ok(net)
    }

    /// The network from its built parts; `branches` are (0-based index of the
    /// stage the branch follows, the branch), in order.
    fn assemble(root: &nn::Path, name: &str, input: InputShape, num_classes: i64, stages: Vec<(&str, Builder)>, branches: Vec<(usize, Builder)>, fin: Builder) -> Self {
        let stage_specs: Vec<StageSpec> = stages.iter().map(|(name, b)| StageSpec { name: name.to_string(), layers: b.layers.clone(), output_shape: b.shape.clone() }).collect();
        let branch_after: Vec<usize> = branches.iter().map(|(after, _)| *after).collect();
        let branch_specs: Vec<BranchSpec> =
            branches.iter().enumerate().map(|(i, (after, b))| BranchSpec { branch: i + 1, after_stage: after + 1, layers: b.layers.clone() }).collect();
        let partition_points = branch_specs
            .iter()
            .map(|b| {
                let shape = stage_specs[b.after_stage - 1].output_shape.clone();
                let elems: i64 = shape.iter().product();
                PartitionPoint { branch: b.branch, activation_shape: shape, activation_bytes: elems as usize * 4 }
            })
            .collect();
        let arch = Architecture { name: name.to_string(), input, num_classes, stages: stage_specs, branches: branch_specs, final_exit: fin.layers.clone(), partition_points };
        Self {
            arch,
            stages: stages.into_iter().map(|(_, b)| b.seq).collect(),
            branches: branches.into_iter().map(|(_, b)| b.seq).collect(),
            branch_after,
            final_exit: fin.seq,
            device: root.device(),
        }
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn num_branches(&self) -> usize {
        self.branches.len()
    }

    /// Checks that `branch` is a valid partition branch (1..=num_branches).
    pub fn check_branch(&self, branch: usize) -> Result<()> {
        check_branch(branch, self.branches.len())
    }

    /// Checks that `xs` is a batch of inputs [N, C, H, W] of this network.
    pub fn check_input(&self, xs: &Tensor) -> Result<()> {
        let want = self.arch.input.dims();
        let size = xs.size();
        if size.len() != 4 || size[1..] != want {
            return Err(ModelError::InvalidArgument { what: "input batch".into(), reason: format!("shape {size:?}, expected [N, {}, {}, {}]", want[0], want[1], want[2]) });
        }
        Ok(())
    }

    /// Checks that `act` is a batch of activations at partition branch k.
    pub fn check_activation(&self, branch: usize, act: &Tensor) -> Result<()> {
        self.check_branch(branch)?;
        let want = &self.arch.partition_points[branch - 1].activation_shape;
        let size = act.size();
        if size.len() != want.len() + 1 || size[1..] != want[..] || act.kind() != Kind::Float {
            return Err(ModelError::InvalidArgument {
                what: format!("activation at branch {branch}"),
                reason: format!("shape {size:?} of {:?}, expected [N, {want:?}] of Float", act.kind()),
            });
        }
        Ok(())
    }

    /// Logits of every exit (branches in order, then final), in training or
    /// inference mode. Gradients flow; use the inference methods otherwise.
    pub fn forward_exits_t(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let mut logits = Vec::with_capacity(self.branches.len() + 1);
        let mut x = xs.shallow_clone();
        let mut next_branch = 0;
        for (i, stage) in self.stages.iter().enumerate() {
            x = stage.forward_t(&x, train);
            while next_branch < self.branches.len() && self.branch_after[next_branch] == i {
                logits.push(self.branches[next_branch].forward_t(&x, train));
                next_branch += 1;
            }
        }
        logits.push(self.final_exit.forward_t(&x, train));
        logits
    }

    /// Inference: logits of every exit, the unpartitioned forward.
    pub fn forward_exits(&self, xs: &Tensor) -> Vec<Tensor> {
        tch::no_grad(|| self.forward_exits_t(xs, false))
    }

    /// Inference on the device side of partition branch k: the stages up to
    /// branch k, then branch k. Returns (branch logits, activation).
    pub fn head(&self, branch: usize, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_branch(branch)?;
        self.check_input(xs)?;
        let last = self.branch_after[branch - 1];
        Ok(tch::no_grad(|| {
            let mut x = xs.shallow_clone();
            for stage in &self.stages[..=last] {
                x = stage.forward_t(&x, false);
            }
            (self.branches[branch - 1].forward_t(&x, false), x)
        }))
    }

    /// Inference on the cloud side of partition branch k: the remaining
    /// stages and the final exit, on `head(k)`'s activation.
    pub fn tail(&self, branch: usize, activation: &Tensor) -> Result<Tensor> {
        self.check_activation(branch, activation)?;
        let first = self.branch_after[branch - 1] + 1;
        Ok(tch::no_grad(|| {
            let mut x = activation.shallow_clone();
            for stage in &self.stages[first..] {
                x = stage.forward_t(&x, false);
            }
            self.final_exit.forward_t(&x, false)
        }))
    }

    /// Inference: one stage alone (0-based), for profiling.
    pub fn run_stage(&self, stage: usize, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.stages[stage].forward_t(x, false))
    }

    /// Inference: one side branch alone (1-based), for profiling.
    pub fn run_branch(&self, branch: usize, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.branches[branch - 1].forward_t(x, false))
    }

    /// Inference: the final exit alone, for profiling.
    pub fn run_final_exit(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.final_exit.forward_t(x, false))
    }

    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Logits of every exit over a whole split, in batches of `batch_size`,
    /// concatenated: one [N, classes] tensor per exit, on the CPU.
    pub fn logits_for(&self, images: &Tensor, batch_size: i64) -> Vec<Tensor> {
        logits_in_batches(images, batch_size, self.device, |xs| Ok(self.forward_exits(xs))).expect("the built-in forward does not fail")
    }
}

/// Checks that `branch` is one of a model's `branches` partition branches
/// (1..=branches), for every kind of model.
pub fn check_branch(branch: usize, branches: usize) -> Result<()> {
    if branch == 0 || branch > branches {
        return Err(ModelError::InvalidArgument { what: "partition branch".into(), reason: format!("{branch} does not exist; this model has branches 1..={branches}") });
    }
    Ok(())
}

/// Every exit's logits over `images`, `forward` run on batches of
/// `batch_size` on `device` and the results concatenated per exit on the
/// CPU, for every kind of model.
pub fn logits_in_batches(images: &Tensor, batch_size: i64, device: Device, forward: impl Fn(&Tensor) -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let n = images.size()[0];
    let mut per_exit: Vec<Vec<Tensor>> = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let exits = forward(&images.narrow(0, start, len).to_device(device))?;
        per_exit.resize_with(exits.len(), Vec::new);
        for (e, l) in exits.into_iter().enumerate() {
            per_exit[e].push(l.to_device(Device::Cpu));
        }
        start += len;
    }
    Ok(per_exit.into_iter().map(|v| Tensor::cat(&v, 0)).collect())
}
