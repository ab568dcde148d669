//! Model cards: the JSON file beside every weights file, and loading a model
//! from the pair.
//!
//! `models/NAME.safetensors` holds the weights; `models/NAME.json` holds the
//! architecture (stages, branches, activation shape and bytes at each
//! partition point), dataset and split, training settings, and per-exit test
//! metrics. A model is always loaded through its card, so the network is
//! rebuilt exactly as it was trained.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Device, Tensor};

use crate::data::{DatasetKind, Normalization, SplitInfo};
use crate::error::{ModelError, Result};
use crate::metrics::ExitMetrics;
use crate::net::{Architecture, EarlyExitNet, ARCHITECTURES};
use crate::train::{EpochSummary, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// File name of the weights, relative to the card's folder.
    pub weights: String,
    /// SHA-256 of the weights file, to catch a card paired with other weights.
    /// The weights file's SHA-256: the model's id everywhere (`model_sha256`
    /// on the wire, in calibration files and reports). Cards written before
    /// the name was unified say `weights_sha256`.
    #[serde(alias = "weights_sha256")]
    pub model_sha256: String,
    pub architecture: Architecture,
    pub dataset: DatasetCard,
    pub training: TrainingCard,
    /// Per-exit metrics on the test set: branches in order, then final.
    pub test_metrics: Vec<NamedExitMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetCard {
    pub name: DatasetKind,
    pub normalization: Normalization,
    pub split: SplitInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingCard {
    pub config: TrainConfig,
    pub optimizer: String,
    pub torch_threads: i32,
    pub duration_s: f64,
    pub history: Vec<EpochSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedExitMetrics {
    pub exit: String,
    #[serde(flatten)]
    pub metrics: ExitMetrics,
}

/// The card's path for a weights path: same folder and stem, `.json`.
pub fn card_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

impl ModelCard {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::BadModelCard { path: path.to_path_buf(), reason: e.to_string() })?;
        let card: ModelCard = serde_json::from_str(&text).map_err(|e| ModelError::BadModelCard { path: path.to_path_buf(), reason: e.to_string() })?;
        if !ARCHITECTURES.contains(&card.architecture.name.as_str()) {
            return Err(ModelError::BadModelCard {
                path: path.to_path_buf(),
                reason: format!("architecture {:?} is not one this build knows ({ARCHITECTURES:?})", card.architecture.name),
            });
        }
        Ok(card)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("model card serialises");
        std::fs::write(path, text + "\n").map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
    }
}

/// A loaded model: the network, the variables it reads, and its card.
pub struct LoadedModel {
    pub net: EarlyExitNet,
    pub vs: nn::VarStore,
    pub card: ModelCard,
    pub weights_path: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("weights_path", &self.weights_path).finish()
    }
}

/// Loads `weights` (a .safetensors file) and its card onto `device`,
/// checking that every variable is present with the shape the architecture
/// expects and that the file is the one the card describes.
///
/// The calling thread is the one that will run the model (each thread loads
/// its own copy), so this also turns on subnormal flushing for it: a thread
/// that forgot `subnormal::prepare_tensor_thread` still computes at full speed.
pub fn load_model(weights: &Path, device: Device) -> Result<LoadedModel> {
    crate::subnormal::flush_subnormals();
    if !weights.is_file() {
        return Err(ModelError::MissingWeights {
            path: weights.to_path_buf(),
            hint: "pass --model with the path of a .safetensors file written by `branchpoint train` \
                   (the project ships models/balexnet-fmnist.safetensors)"
                .into(),
        });
    }
    let card_file = card_path(weights);
    let card = ModelCard::read(&card_file)?;
    let digest = sha256_file(weights)?;
    if digest != card.model_sha256 {
        return Err(ModelError::WeightsMismatch {
            path: weights.to_path_buf(),
            reason: format!("its SHA-256 is {digest}, the card {} expects {}; retrain or restore the pair", card_file.display(), card.model_sha256),
        });
    }
    let mut vs = nn::VarStore::new(device);
    let net = EarlyExitNet::build(&vs.root(), &card.architecture.name, card.architecture.input, card.architecture.num_classes)?;
    if net.architecture() != &card.architecture {
        return Err(ModelError::BadModelCard { path: card_file, reason: "its architecture summary differs from the network this build constructs".into() });
    }
    load_weights(&mut vs, weights)?;
    Ok(LoadedModel { net, vs, card, weights_path: weights.to_path_buf() })
}

/// Copies the tensors of a safetensors file into `vs`, refusing missing,
/// unexpected or wrongly shaped tensors (VarStore::load alone would let a
/// broadcastable shape through).
pub fn load_weights(vs: &mut nn::VarStore, path: &Path) -> Result<()> {
    let mismatch = |reason: String| ModelError::WeightsMismatch { path: path.to_path_buf(), reason };
    let stored: HashMap<String, Tensor> = Tensor::read_safetensors(path).map_err(|e| mismatch(format!("not a readable safetensors file ({e})")))?.into_iter().collect();
    let mut vars = vs.variables();
    for (name, var) in vars.iter_mut() {
        let src = stored.get(name).ok_or_else(|| mismatch(format!("tensor {name} is missing")))?;
        if src.size() != var.size() {
            return Err(mismatch(format!("tensor {name} has shape {:?}, expected {:?}", src.size(), var.size())));
        }
        tch::no_grad(|| var.f_copy_(src))?;
    }
    if let Some(extra) = stored.keys().find(|k| !vars.contains_key(*k)) {
        return Err(mismatch(format!("tensor {extra} is not part of this architecture")));
    }
    Ok(())
}
