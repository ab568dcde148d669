//! One model interface for every command: the built-in early-exit network
//! (`card::LoadedModel`, weights in safetensors) or a user's network
//! exported as TorchScript heads and tails (`imported::ImportedNet`). Both
//! are loaded only through their card; `Model::load` tells them apart by
//! the file it is given:
//! - `NAME.safetensors`, or a built-in card `NAME.json`: the built-in
//!   network (its card beside the weights);
//! - a card whose `format` is `branchpoint-torchscript/1`: an imported one.
//!
//! Whatever the kind, a model is named on the wire, in calibration files
//! and in the control store by its SHA-256 (`Model::sha256`): the weights
//! file's for a built-in model, the card file's for an imported one (the
//! card holds the SHA-256 of every head and tail, so it names them all).
use std::path::Path;

use tch::{Device, Tensor};

use crate::card::{card_path, load_model, LoadedModel, NamedExitMetrics};
use branchpoint_core::calibration::ExitLogits;
use branchpoint_messages::Codec;

use crate::data::{Dataset, DatasetKind, InputShape, ModelData, Normalization, Split, HELD_OUT};
use crate::error::{ModelError, Result};
use crate::exits::{exit_logits, recorded};
use crate::imported::{ImportedNet, FORMAT};
use crate::net::PartitionPoint;

/// A loaded model of either kind. Each thread that runs tensors loads its
/// own (tch modules are Send but not Sync).
#[derive(Debug)]
pub enum Model {
    // Boxed: both are hundreds of bytes (layers, cards), and the enum is moved whole.
    Builtin(Box<LoadedModel>),
    Imported(Box<ImportedNet>),
}

impl Model {
    /// Loads the model `path` names onto `device`: a built-in model's
    /// weights or card, or an imported model's card.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "json") {
            let format = card_format(path)?;
            return match format.as_deref() {
                Some(FORMAT) => Ok(Self::Imported(Box::new(ImportedNet::load(path, device)?))),
                Some(other) => Err(ModelError::BadModelCard {
                    path: path.to_path_buf(),
                    reason: format!("format {other:?}: this build reads {FORMAT:?} cards (written by python/export.py) and built-in cards (written by `branchpoint train`)"),
                }),
                // A built-in card: its weights file is named in it, beside it.
                None => {
                    let card = crate::card::ModelCard::read(path)?;
                    let weights = path.with_file_name(&card.weights);
                    if card_path(&weights) != path {
                        return Err(ModelError::BadModelCard {
                            path: path.to_path_buf(),
                            reason: format!("it names weights {:?}; a built-in card is NAME.json beside NAME.safetensors", card.weights),
                        });
                    }
                    Ok(Self::Builtin(Box::new(load_model(&weights, device)?)))
                }
            };
        }
        Ok(Self::Builtin(Box::new(load_model(path, device)?)))
    }

    /// What the wire, calibration files and the control store name this
    /// model by (see the module's documentation).
    pub fn sha256(&self) -> &str {
        match self {
            Self::Builtin(m) => &m.card.model_sha256,
            Self::Imported(m) => m.sha256(),
        }
    }

    /// The file a calibration file records as the model: the weights' or
    /// the card's name.
    pub fn file_name(&self) -> String {
        match self {
            Self::Builtin(m) => m.card.weights.clone(),
            Self::Imported(m) => m.card_path().file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        }
    }

    /// What the model is, in a few words: "b-vgg-small on fashion-mnist",
    /// "imported TorchScript model mobilenet-ee-fmnist".
    pub fn description(&self) -> String {
        match self {
            Self::Builtin(m) => format!("{} on {}", m.card.architecture.name, m.card.dataset.name.name()),
            Self::Imported(m) => format!("imported TorchScript model {}", m.card().name),
        }
    }

    pub fn input(&self) -> InputShape {
        match self {
            Self::Builtin(m) => m.card.architecture.input,
            Self::Imported(m) => m.card().input,
        }
    }

    /// How raw inputs in [0, 1] are standardised for this model.
    pub fn normalization(&self) -> &Normalization {
        match self {
            Self::Builtin(m) => &m.card.dataset.normalization,
            Self::Imported(m) => &m.card().normalization,
        }
    }

    pub fn num_classes(&self) -> i64 {
        match self {
            Self::Builtin(m) => m.card.architecture.num_classes,
            Self::Imported(m) => m.card().num_classes,
        }
    }

    pub fn num_branches(&self) -> usize {
        self.partition_points().len()
    }

    /// Side branches, then the final exit.
    pub fn num_exits(&self) -> usize {
        self.num_branches() + 1
    }

    /// "branch 1", ..., "final": the names reports and calibration files use.
    pub fn exit_names(&self) -> Vec<String> {
        crate::net::exit_names(self.num_branches())
    }

    /// What crosses the cut at each partition branch, branch 1 first.
    pub fn partition_points(&self) -> &[PartitionPoint] {
        match self {
            Self::Builtin(m) => &m.net.architecture().partition_points,
            Self::Imported(m) => m.partition_points(),
        }
    }

    /// Checks that `branch` is one of this model's partition branches.
    pub fn check_branch(&self, branch: usize) -> Result<()> {
        crate::net::check_branch(branch, self.num_branches())
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Builtin(m) => m.net.device(),
            Self::Imported(m) => m.device(),
        }
    }

    /// The device side of partition branch k on inputs `[N, C, H, W]`:
    /// (branch logits `[N, classes]`, activation `[N, ...]`).
    pub fn head(&self, branch: usize, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Builtin(m) => m.net.head(branch, xs),
            Self::Imported(m) => m.head(branch, xs),
        }
    }

    /// The cloud side of partition branch k on `head(k)`'s activation:
    /// final logits `[N, classes]`.
    pub fn tail(&self, branch: usize, activation: &Tensor) -> Result<Tensor> {
        match self {
            Self::Builtin(m) => m.net.tail(branch, activation),
            Self::Imported(m) => m.tail(branch, activation),
        }
    }

    /// Every exit's logits on a batch (branches in order, then final).
    pub fn forward_exits(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Builtin(m) => {
                m.net.check_input(xs)?;
                Ok(m.net.forward_exits(xs))
            }
            Self::Imported(m) => m.forward_exits(xs),
        }
    }

    /// Every exit's logits over a whole split, in batches of `batch_size`,
    /// concatenated: one `[N, classes]` tensor per exit, on the CPU.
    pub fn logits_for(&self, images: &Tensor, batch_size: i64) -> Result<Vec<Tensor>> {
        crate::net::logits_in_batches(images, batch_size, self.device(), |xs| self.forward_exits(xs))
    }

    /// The test metrics the card records per exit, where it records them
    /// (a built-in model's card does; an exported one's does not).
    pub fn card_test_metrics(&self) -> Option<&[NamedExitMetrics]> {
        match self {
            Self::Builtin(m) => Some(&m.card.test_metrics),
            Self::Imported(_) => None,
        }
    }

    /// The built-in dataset the model was trained on, if it was (corrupting
    /// inputs and other per-dataset steps need it).
    pub fn dataset(&self) -> Option<DatasetKind> {
        match self {
            Self::Builtin(m) => Some(m.card.dataset.name),
            Self::Imported(m) => DatasetKind::parse(&m.card().data.as_ref()?.test).ok(),
        }
    }

    /// Loads the validation and test inputs the card names: a built-in
    /// model's held-out split and test set; for an imported model, a
    /// built-in dataset (split as its card records) or the user's tensor
    /// files (paths relative to the card). `data_dir` overrides where a
    /// built-in dataset is read from.
    pub fn load_data(&self, data_dir: Option<&Path>) -> Result<ModelData> {
        match self {
            Self::Builtin(m) => {
                let c = &m.card;
                let dir = data_dir.map_or_else(|| c.dataset.name.default_dir(), Path::to_path_buf);
                let (validation, test, _) = Dataset::load_held_out(c.dataset.name, &dir, c.dataset.split.validation, c.dataset.split.seed)?;
                Ok(ModelData { validation, test, validation_source: HELD_OUT.into(), test_source: format!("{} test set", c.dataset.name.name()), split_seed: c.dataset.split.seed })
            }
            Self::Imported(m) => m.load_data(data_dir),
        }
    }
}

/// The `format` key of a JSON card, if it has one.
fn card_format(path: &Path) -> Result<Option<String>> {
    let bad = |reason: String| ModelError::BadModelCard { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match value.get("format") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!("format is {other}, not a string"))),
    }
}

/// Every exit's answers over a split, as plain `ExitLogits` (branches in
/// order, then final).
pub fn split_exit_logits(model: &Model, split: &Split) -> Result<Vec<ExitLogits>> {
    model.logits_for(&split.images, 500)?.iter().map(|z| exit_logits(z, &split.labels)).collect()
}

/// `split_exit_logits`, recorded once per (model, inputs) and read back
/// after (`exits::recorded`).
pub fn recorded_split_exit_logits(model: &Model, split: &Split) -> Result<Vec<ExitLogits>> {
    recorded(model.sha256(), split, || split_exit_logits(model, split))
}

/// The final exit's answers over a split when the activation of branch k
/// crosses the wire under `codec`: one `ExitLogits` per branch. Each input's
/// activation is encoded alone, as a device sends it (an int8 scale per
/// channel of that input), and decoded before the tail.
pub fn codec_final_logits(model: &Model, split: &Split, codec: Codec) -> Result<Vec<ExitLogits>> {
    codec_final_logits_with(model, split, codec.name(), |shape, values, out| codec.round_trip_into(shape, values, out))
}

/// `codec_final_logits` with any round trip of one input's activation
/// (shape `[1, ...]`, row-major values, appended to the output): what the
/// tail gets instead.
pub fn codec_final_logits_with(
    model: &Model,
    split: &Split,
    what: &str,
    round_trip: impl Fn(&[u32], &[f32], &mut Vec<f32>) -> std::result::Result<(), branchpoint_messages::MessageError>,
) -> Result<Vec<ExitLogits>> {
    // Small batches: an activation batch and its decoded copy stay a few MB,
    // reused by the allocator rather than fresh pages each time.
    const BATCH: i64 = 100;
    let bad = |e: branchpoint_messages::MessageError| ModelError::InvalidArgument { what: format!("{what} activation"), reason: e.to_string() };
    let n = split.len() as i64;
    let mut decoded: Vec<f32> = Vec::new();
    (1..=model.num_branches())
        .map(|k| {
            let mut logits = Vec::new();
            let mut start = 0;
            while start < n {
                let len = BATCH.min(n - start);
                let xs = split.images.narrow(0, start, len).to_device(model.device());
                let (_, activation) = model.head(k, &xs)?;
                let activation = activation.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous();
                let size = activation.size();
                let values: Vec<f32> = Vec::try_from(activation.flatten(0, -1))?;
                let per_input = values.len() / len as usize;
                let mut item_shape: Vec<u32> = vec![1];
                item_shape.extend(size[1..].iter().map(|&d| d as u32));
                decoded.clear();
                for item in values.chunks(per_input.max(1)) {
                    round_trip(&item_shape, item, &mut decoded).map_err(bad)?;
                }
                let decoded = Tensor::from_slice(&decoded).view(size.as_slice()).to_device(model.device());
                logits.push(model.tail(k, &decoded)?.to_device(tch::Device::Cpu));
                start += len;
            }
            exit_logits(&Tensor::cat(&logits, 0), &split.labels)
        })
        .collect()
}

/// `codec_final_logits`, recorded once per (model, codec, inputs).
pub fn recorded_codec_final_logits(model: &Model, split: &Split, codec: Codec) -> Result<Vec<ExitLogits>> {
    let key = format!("{} final exit under codec {codec} revision {}", model.sha256(), branchpoint_messages::codec::CODEC_REVISION);
    recorded(&key, split, || codec_final_logits(model, split, codec))
}
