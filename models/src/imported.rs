//! A user's own early-exit network, exported by `python/export.py`: per
//! partition branch k a TorchScript head (input -> branch-k logits and the
//! activation to offload) and tail (activation -> final logits), loaded
//! only through their card (`NAME.json`, format `branchpoint-torchscript/1`),
//! which names every file with its SHA-256.
//!
//! Every output is checked against the card before it is used: a head must
//! return two tensors, logits `[N, classes]` and an activation of the
//! card's shape; a tail must take that activation and return `[N,
//! classes]`. So a file that does not fit its card is an error naming the
//! file, never a silent wrong answer.
//!
//! Commands reach it through `model::Model`, beside the built-in network.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{CModule, Device, IValue, Tensor};

use crate::card::sha256_file;
use crate::data::{read_tensor_split, Dataset, DatasetKind, InputShape, ModelData, Normalization, Split, HELD_OUT};
use crate::error::{ModelError, Result};
use crate::net::PartitionPoint;

/// The card format this build reads (what `python/export.py` writes).
pub const FORMAT: &str = "branchpoint-torchscript/1";

/// `NAME.json` as `python/export.py` writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedCard {
    pub format: String,
    pub name: String,
    pub input: InputShape,
    pub normalization: Normalization,
    pub num_classes: i64,
    /// The description's trunk and final steps, for the record.
    pub trunk: Vec<String>,
    #[serde(rename = "final")]
    pub final_steps: Vec<String>,
    pub branches: Vec<ImportedBranch>,
    /// Where the validation and test data come from; without it the
    /// commands that need data refuse the model.
    #[serde(default)]
    pub data: Option<ImportedData>,
}

/// An imported model's validation and test data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedData {
    /// A built-in dataset's name (`fashion-mnist`, `cifar-10`: its
    /// validation split held out of the training set) or the path of a
    /// tensor file (`data::read_tensor_split`), relative to the card.
    pub validation: String,
    /// A built-in dataset's name (its test set) or a tensor file's path.
    pub test: String,
    /// How a built-in dataset's training set was split, so the validation
    /// inputs are the ones the model did not train on.
    #[serde(default)]
    pub split: Option<DataSplit>,
}

/// The seed and validation size of a built-in dataset's train/validation
/// split (`data::train_validation_indices`; `python/fmnist.py` makes the
/// same split).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSplit {
    pub seed: u64,
    pub validation: usize,
}

impl Default for DataSplit {
    fn default() -> Self {
        Self { seed: crate::data::DEFAULT_SPLIT_SEED, validation: crate::data::DEFAULT_VALIDATION_SIZE }
    }
}

/// One partition branch of an imported model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedBranch {
    pub branch: usize,
    /// The trunk block the branch follows.
    pub after: String,
    /// The activation at this partition point, per input ([C, H, W] or any
    /// other shape), and its size in bytes as f32.
    pub activation_shape: Vec<i64>,
    pub activation_bytes: u64,
    pub head: String,
    pub head_sha256: String,
    pub tail: String,
    pub tail_sha256: String,
}

impl ImportedCard {
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadModelCard { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let card: ImportedCard = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if card.format != FORMAT {
            return Err(bad(format!("format {:?}: this build reads {FORMAT:?} (write it with python/export.py)", card.format)));
        }
        if card.branches.is_empty() {
            return Err(bad("no side branches".into()));
        }
        for (i, b) in card.branches.iter().enumerate() {
            if b.branch != i + 1 {
                return Err(bad(format!("branches[{i}] is branch {}; branches are numbered 1, 2, ... in order", b.branch)));
            }
            let values: i64 = b.activation_shape.iter().product();
            if b.activation_shape.is_empty() || b.activation_shape.iter().any(|&d| d <= 0) || b.activation_bytes != 4 * values as u64 {
                return Err(bad(format!("branch {}: activation shape {:?} and {} bytes do not agree (4 bytes per f32 value)", b.branch, b.activation_shape, b.activation_bytes)));
            }
        }
        if card.num_classes < 2 {
            return Err(bad(format!("num_classes {}: an exit scores at least 2 classes", card.num_classes)));
        }
        Ok(card)
    }
}

/// One partition branch's TorchScript modules.
struct Partition {
    head: CModule,
    tail: CModule,
}

/// A loaded imported model: its card and every head and tail.
pub struct ImportedNet {
    card: ImportedCard,
    card_path: PathBuf,
    /// The card file's SHA-256: the model's name on the wire.
    pub(crate) card_sha256: String,
    partition_points: Vec<PartitionPoint>,
    parts: Vec<Partition>,
    device: Device,
}

impl std::fmt::Debug for ImportedNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedNet").field("card", &self.card_path).field("branches", &self.parts.len()).finish()
    }
}

impl ImportedNet {
    /// Loads the model a card describes onto `device`: every file must
    /// exist beside the card and have the SHA-256 the card names.
    pub fn load(card_path: &Path, device: Device) -> Result<Self> {
        crate::subnormal::flush_subnormals();
        let card = ImportedCard::read(card_path)?;
        let dir = card_path.parent().unwrap_or(Path::new("."));
        let module = |file: &str, sha: &str| -> Result<CModule> {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(ModelError::MissingWeights { path, hint: format!("the card {} names it; export the model again with python/export.py", card_path.display()) });
            }
            let digest = sha256_file(&path)?;
            if digest != sha {
                return Err(ModelError::WeightsMismatch {
                    path,
                    reason: format!("its SHA-256 is {digest}, the card {} expects {sha}; export the model again or restore the files", card_path.display()),
                });
            }
            let mut m = CModule::load_on_device(&path, device)
                .map_err(|e| ModelError::WeightsMismatch { path: path.clone(), reason: format!("not a TorchScript module tch can load: {e}") })?;
            m.set_eval();
            Ok(m)
        };
        let parts = card.branches.iter().map(|b| Ok(Partition { head: module(&b.head, &b.head_sha256)?, tail: module(&b.tail, &b.tail_sha256)? })).collect::<Result<Vec<_>>>()?;
        let partition_points = card
            .branches
            .iter()
            .map(|b| PartitionPoint { branch: b.branch, activation_shape: b.activation_shape.clone(), activation_bytes: b.activation_bytes as usize })
            .collect();
        Ok(Self { card_sha256: sha256_file(card_path)?, card, card_path: card_path.to_path_buf(), partition_points, parts, device })
    }

    pub fn card(&self) -> &ImportedCard {
        &self.card
    }

    pub fn card_path(&self) -> &Path {
        &self.card_path
    }

    /// What crosses the cut at each partition branch, branch 1 first.
    pub fn partition_points(&self) -> &[PartitionPoint] {
        &self.partition_points
    }

    pub fn num_branches(&self) -> usize {
        self.parts.len()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn branch(&self, branch: usize) -> Result<(&ImportedBranch, &Partition)> {
        // The card and the modules have one entry per branch, in order.
        // The card and the modules have one entry per branch, in order.
        crate::net::check_branch(branch, self.parts.len())?;
        Ok((&self.card.branches[branch - 1], &self.parts[branch - 1]))
    }

    fn refused(&self, file: &str, reason: String) -> ModelError {
        ModelError::WeightsMismatch { path: self.card_path.with_file_name(file), reason }
    }

    /// The device side of partition branch k on inputs `[N, C, H, W]`:
    /// (branch logits `[N, classes]`, activation `[N, ...]`).
    pub fn head(&self, branch: usize, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, p) = self.branch(branch)?;
        let want = [self.card.input.channels, self.card.input.height, self.card.input.width];
        let size = xs.size();
        if size.len() != 4 || size[1..] != want {
            return Err(ModelError::InvalidArgument { what: "input".into(), reason: format!("shape {size:?}, the model takes [N, {}, {}, {}]", want[0], want[1], want[2]) });
        }
        let out = tch::no_grad(|| p.head.forward_is(&[IValue::Tensor(xs.shallow_clone())])).map_err(|e| self.refused(&b.head, format!("its forward failed: {e}")))?;
        let (logits, activation) = match out {
            IValue::Tuple(mut v) if v.len() == 2 => match (v.remove(0), v.remove(0)) {
                (IValue::Tensor(l), IValue::Tensor(a)) => (l, a),
                _ => return Err(self.refused(&b.head, "it returned a pair that is not two tensors; a head returns (logits, activation)".into())),
            },
            other => return Err(self.refused(&b.head, format!("it returned {}, not (logits, activation)", ivalue_kind(&other)))),
        };
        let n = size[0];
        if logits.size() != [n, self.card.num_classes] {
            return Err(self.refused(&b.head, format!("its logits have shape {:?}, the card says [{n}, {}]", logits.size(), self.card.num_classes)));
        }
        let mut act_want = vec![n];
        act_want.extend(&b.activation_shape);
        if activation.size() != act_want {
            return Err(self.refused(&b.head, format!("its activation has shape {:?}, the card says {act_want:?}", activation.size())));
        }
        Ok((logits, activation))
    }

    /// The cloud side of partition branch k on `head(k)`'s activation:
    /// final logits `[N, classes]`.
    pub fn tail(&self, branch: usize, activation: &Tensor) -> Result<Tensor> {
        let (b, p) = self.branch(branch)?;
        let size = activation.size();
        if size.len() != b.activation_shape.len() + 1 || size[1..] != b.activation_shape[..] {
            return Err(ModelError::InvalidArgument {
                what: "activation".into(),
                reason: format!("shape {size:?}, branch {branch} of this model offloads [N, {}]", b.activation_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
            });
        }
        let logits =
            tch::no_grad(|| p.tail.forward_ts(&[activation.shallow_clone()])).map_err(|e| self.refused(&b.tail, format!("it refused branch {branch}'s activation: {e}")))?;
        if logits.size() != [size[0], self.card.num_classes] {
            return Err(self.refused(&b.tail, format!("its logits have shape {:?}, the card says [{}, {}]", logits.size(), size[0], self.card.num_classes)));
        }
        Ok(logits)
    }

    /// Every exit's logits (branches in order, then final): each branch's
    /// head, and the final exit through branch 1's tail.
    pub fn forward_exits(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut exits = Vec::with_capacity(self.parts.len() + 1);
        let mut first_activation = None;
        for k in 1..=self.parts.len() {
            let (logits, activation) = self.head(k, xs)?;
            exits.push(logits);
            if k == 1 {
                first_activation = Some(activation);
            }
        }
        let activation = first_activation.expect("a card has at least one branch");
        exits.push(self.tail(1, &activation)?);
        Ok(exits)
    }

    /// See `Model::load_data`.
    pub fn load_data(&self, data_dir: Option<&Path>) -> Result<ModelData> {
        let card = self.card();
        let Some(data) = &card.data else {
            return Err(ModelError::BadModelCard {
                path: self.card_path().to_path_buf(),
                reason: "it names no validation and test data; export it again with a [data] table (python/README.md)".into(),
            });
        };
        let base = self.card_path().parent().unwrap_or(Path::new(".")).to_path_buf();
        // A built-in dataset is loaded once even if it serves both sides.
        let mut builtin: Option<(DatasetKind, Split, Split)> = None;
        let mut side = |source: &str, validation: bool| -> Result<Split> {
            match DatasetKind::parse(source) {
                Ok(kind) => {
                    if kind.input_shape() != card.input || kind.num_classes() != card.num_classes {
                        return Err(ModelError::BadModelCard {
                            path: self.card_path().to_path_buf(),
                            reason: format!(
                                "its data {source:?} has inputs {:?} and {} classes; the model takes {:?} and {}",
                                kind.input_shape(),
                                kind.num_classes(),
                                card.input,
                                card.num_classes
                            ),
                        });
                    }
                    if builtin.as_ref().is_none_or(|(k, _, _)| *k != kind) {
                        let split = data.split.clone().unwrap_or_default();
                        let dir = data_dir.map_or_else(|| kind.default_dir(), Path::to_path_buf);
                        let (v, t, _) = Dataset::load_held_out(kind, &dir, split.validation, split.seed)?;
                        builtin = Some((kind, v, t));
                    }
                    let (_, v, t) = builtin.as_ref().expect("loaded above");
                    Ok(if validation { v.shallow() } else { t.shallow() })
                }
                Err(_) => read_tensor_split(&resolve(&base, source), card.input, card.num_classes),
            }
        };
        let validation = side(&data.validation, true)?;
        let test = side(&data.test, false)?;
        let split = data.split.clone().unwrap_or_default();
        let describe = |source: &str, validation: bool| match DatasetKind::parse(source) {
            Ok(kind) if validation => format!("{}: {} (seed {})", kind.name(), HELD_OUT, split.seed),
            Ok(kind) => format!("{} test set", kind.name()),
            Err(_) => format!("tensor file {source}"),
        };
        Ok(ModelData {
            validation,
            test,
            validation_source: describe(&data.validation, true),
            test_source: describe(&data.test, false),
            split_seed: if DatasetKind::parse(&data.validation).is_ok() { split.seed } else { 0 },
        })
    }

    /// What the wire and the calibration files name this model by: the
    /// SHA-256 of its card, which names every module by its own SHA-256.
    pub fn sha256(&self) -> &str {
        &self.card_sha256
    }
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::Tensor(_) => "one tensor",
        IValue::Tuple(_) => "a tuple of another length",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::None => "None",
        _ => "something else",
    }
}
