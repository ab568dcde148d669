//! Datasets: Fashion-MNIST (IDX files, gzipped or plain) and CIFAR-10 (binary
//! batches), normalised into tensors, with a deterministic seeded split of the
//! training set into train and validation.
//!
//! Validation data is for calibration; the test set is only for evaluation.
//! Nothing here ever mixes the two.
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use branchpoint_core::rng::SplitMix64;

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const FASHION_MNIST_DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Default size of the validation split held out of the training set.
pub const DEFAULT_VALIDATION_SIZE: usize = 5_000;
/// Default seed of the train/validation split.
pub const DEFAULT_SPLIT_SEED: u64 = 2021;

const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    FashionMnist,
    Cifar10,
}

impl DatasetKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "fashion-mnist" => Ok(Self::FashionMnist),
            "cifar-10" | "cifar10" => Ok(Self::Cifar10),
            other => Err(ModelError::InvalidArgument { what: "dataset".into(), reason: format!("unknown dataset {other:?}; expected fashion-mnist or cifar-10") }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::FashionMnist => "fashion-mnist",
            Self::Cifar10 => "cifar-10",
        }
    }

    /// The image shape the dataset yields.
    pub fn input_shape(self) -> InputShape {
        match self {
            Self::FashionMnist => InputShape { channels: 1, height: 28, width: 28 },
            Self::Cifar10 => InputShape { channels: 3, height: 32, width: 32 },
        }
    }

    pub fn num_classes(self) -> i64 {
        10
    }

    /// Per-channel mean and standard deviation of the training images (in
    /// [0, 1] units), used to standardise inputs. Fixed constants, recorded
    /// in the model card, so a device and a worker standardise alike.
    pub fn normalization(self) -> Normalization {
        match self {
            Self::FashionMnist => Normalization { mean: vec![0.2860], std: vec![0.3530] },
            Self::Cifar10 => Normalization { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2470, 0.2435, 0.2616] },
        }
    }

    pub fn default_dir(self) -> PathBuf {
        match self {
            Self::FashionMnist => PathBuf::from(FASHION_MNIST_DEFAULT_DIR),
            Self::Cifar10 => PathBuf::from("data/cifar-10-batches-bin"),
        }
    }

    fn how_to_get(self) -> String {
        match self {
            Self::FashionMnist => format!(
                "install it with `apt-get install dataset-fashion-mnist` (scripts/setup.sh does this), \
                 which puts the IDX files in {FASHION_MNIST_DEFAULT_DIR}, or pass --data-dir DIR \
                 holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], \
                 t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
            ),
            Self::Cifar10 => "pass --data-dir DIR holding the CIFAR-10 binary version \
                 (data_batch_1.bin .. data_batch_5.bin and test_batch.bin, from \
                 cifar-10-binary.tar.gz)"
                .to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    pub channels: i64,
    pub height: i64,
    pub width: i64,
}

impl InputShape {
    pub fn dims(&self) -> [i64; 3] {
        [self.channels, self.height, self.width]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Normalization {
    /// Maps raw u8 pixels laid out as [N, C, H, W] to standardised f32:
    /// `(x / 255 - mean) / std` in f32. In place on one new tensor: the
    /// same values as three out-of-place steps, without two dataset-sized
    /// temporaries (each a fresh mapping the kernel faults in and zeroes).
    pub fn apply(&self, raw: &Tensor) -> Tensor {
        let c = self.mean.len() as i64;
        let mean = Tensor::from_slice(&self.mean).to_kind(Kind::Float).view([1, c, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_kind(Kind::Float).view([1, c, 1, 1]);
        let mut x = raw.to_kind(Kind::Float);
        let _ = x.g_div_scalar_(255.0);
        let _ = x.g_sub_(&mean);
        let _ = x.g_div_(&std);
        x
    }
}

/// Images (standardised f32, [N, C, H, W]) and labels (i64, [N]).
#[derive(Debug)]
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Split {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::from_slice(&idx);
        Split { images: self.images.index_select(0, &idx), labels: self.labels.index_select(0, &idx) }
    }

    /// The same tensors, shared (tensors are reference counted).
    pub fn shallow(&self) -> Split {
        Split { images: self.images.shallow_clone(), labels: self.labels.shallow_clone() }
    }

    /// The first `n` rows (all of them if there are fewer).
    pub fn head(&self, n: usize) -> Split {
        let n = n.min(self.len()) as i64;
        Split { images: self.images.narrow(0, 0, n), labels: self.labels.narrow(0, 0, n) }
    }
}

/// A split the user brings: a safetensors file holding `inputs` (f32,
/// `[N, C, H, W]`, standardised as the model takes them) and `labels`
/// (integers in `0..num_classes`, `[N]`; any integer dtype). Every
/// problem is an error naming the file, the tensor and what was expected.
/// `python/tensorfile.py` writes such files.
pub fn read_tensor_split(path: &Path, input: InputShape, num_classes: i64) -> Result<Split> {
    let bad = |reason: String| ModelError::CorruptDataFile {
        path: path.to_path_buf(),
        what: "tensor file".into(),
        reason,
        hint: "a safetensors file with `inputs` (f32, [N, C, H, W], standardised) and `labels` (integers, [N]); python/tensorfile.py writes one".into(),
    };
    if !path.is_file() {
        return Err(ModelError::MissingDataFile {
            path: path.to_path_buf(),
            hint: "give the path of a safetensors file with `inputs` and `labels` (python/tensorfile.py writes one)".into(),
        });
    }
    let mut tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(path).map_err(|e| bad(format!("not a readable safetensors file ({e})")))?.into_iter().collect();
    let inputs = tensors.remove("inputs").ok_or_else(|| bad("it has no tensor named `inputs`".into()))?;
    let labels = tensors.remove("labels").ok_or_else(|| bad("it has no tensor named `labels`".into()))?;
    let want = input.dims();
    let size = inputs.size();
    if inputs.kind() != Kind::Float {
        return Err(bad(format!("`inputs` is {:?}, expected f32", inputs.kind())));
    }
    if size.len() != 4 || size[1..] != want || size[0] == 0 {
        return Err(bad(format!("`inputs` has shape {size:?}, expected [N, {}, {}, {}] with N >= 1", want[0], want[1], want[2])));
    }
    if !matches!(labels.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Err(bad(format!("`labels` is {:?}, expected integers", labels.kind())));
    }
    let labels = labels.to_kind(Kind::Int64);
    if labels.size() != [size[0]] {
        return Err(bad(format!("`labels` has shape {:?}, expected [{}] (one per input)", labels.size(), size[0])));
    }
    let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
    if lo < 0 || hi >= num_classes {
        return Err(bad(format!("`labels` range from {lo} to {hi}, expected 0 to {} (the model's {num_classes} classes)", num_classes - 1)));
    }
    let finite = inputs.isfinite().all().to_kind(Kind::Int64).int64_value(&[]) == 1;
    if !finite {
        return Err(bad("`inputs` holds NaN or infinite values".into()));
    }
    Ok(Split { images: inputs, labels })
}

/// How the training set was split; recorded in the model card so calibration
/// later uses exactly the held-out validation inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub seed: u64,
    pub train: usize,
    pub validation: usize,
    pub test: usize,
}

#[derive(Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub train: Split,
    pub validation: Split,
    pub test: Split,
    pub split: SplitInfo,
}

impl Dataset {
    /// Loads `kind` from `dir` and splits its training set into train and
    /// validation with `seed`.
    pub fn load(kind: DatasetKind, dir: &Path, validation_size: usize, seed: u64) -> Result<Self> {
        let raw = RawDataset::read(kind, dir, validation_size, seed)?;
        let train = raw.split(&raw.train_idx);
        Ok(Dataset { kind, validation: raw.split(&raw.val_idx), test: raw.test(), train, split: raw.info })
    }

    /// The held-out validation split and the test set, as `load` gives
    /// them, without the training split: what calibration, evaluation,
    /// replays, fleets and services read (the training images are read,
    /// since the validation split is drawn from them, but only the drawn
    /// rows become floats).
    pub fn load_held_out(kind: DatasetKind, dir: &Path, validation_size: usize, seed: u64) -> Result<(Split, Split, SplitInfo)> {
        let raw = RawDataset::read(kind, dir, validation_size, seed)?;
        Ok((raw.split(&raw.val_idx), raw.test(), raw.info))
    }
}

/// A dataset's raw pixels and labels, and its seeded train/validation
/// split as row indices: rows are chosen on the bytes and only the chosen
/// ones are standardised (element-wise, so a row's values do not depend on
/// which others are standardised with it).
struct RawDataset {
    kind: DatasetKind,
    train_raw: Vec<u8>,
    train_labels: Vec<u8>,
    test_raw: Vec<u8>,
    test_labels: Vec<u8>,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    info: SplitInfo,
}

impl RawDataset {
    fn read(kind: DatasetKind, dir: &Path, validation_size: usize, seed: u64) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::MissingDataDir { dir: dir.to_path_buf(), hint: kind.how_to_get() });
        }
        let (train_raw, train_labels, test_raw, test_labels) = match kind {
            DatasetKind::FashionMnist => {
                let (tr_x, tr_y) = read_idx_pair(kind, dir, "train")?;
                let (te_x, te_y) = read_idx_pair(kind, dir, "t10k")?;
                (tr_x, tr_y, te_x, te_y)
            }
            DatasetKind::Cifar10 => {
                let mut tr_x = Vec::new();
                let mut tr_y = Vec::new();
                for i in 1..=5 {
                    let (x, y) = read_cifar_batch(&dir.join(format!("data_batch_{i}.bin")))?;
                    tr_x.extend(x);
                    tr_y.extend(y);
                }
                let (te_x, te_y) = read_cifar_batch(&dir.join("test_batch.bin"))?;
                (tr_x, tr_y, te_x, te_y)
            }
        };
        let (train_idx, val_idx) = train_validation_indices(train_labels.len(), validation_size, seed)?;
        let info = SplitInfo { seed, train: train_idx.len(), validation: val_idx.len(), test: test_labels.len() };
        Ok(RawDataset { kind, train_raw, train_labels, test_raw, test_labels, train_idx, val_idx, info })
    }

    /// `pixels` (whole rows, [N, C, H, W] order) standardised, with their labels.
    fn to_split(&self, pixels: &[u8], labels: Vec<i64>) -> Split {
        let shape = self.kind.input_shape();
        let images = Tensor::from_slice(pixels).view([labels.len() as i64, shape.channels, shape.height, shape.width]);
        Split { images: self.kind.normalization().apply(&images), labels: Tensor::from_slice(&labels) }
    }

    /// The training file's rows at `indices`, in that order.
    fn split(&self, indices: &[usize]) -> Split {
        let row = self.train_raw.len() / self.train_labels.len().max(1);
        let mut pixels = Vec::with_capacity(indices.len() * row);
        for &i in indices {
            pixels.extend_from_slice(&self.train_raw[i * row..(i + 1) * row]);
        }
        self.to_split(&pixels, indices.iter().map(|&i| i64::from(self.train_labels[i])).collect())
    }

    fn test(&self) -> Split {
        self.to_split(&self.test_raw, self.test_labels.iter().map(|&y| i64::from(y)).collect())
    }
}

/// Deterministic split of `0..n` into (train, validation) index lists, each
/// sorted ascending. The same (n, validation_size, seed) always gives the
/// same split.
pub fn train_validation_indices(n: usize, validation_size: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if validation_size >= n {
        return Err(ModelError::InvalidArgument { what: "validation size".into(), reason: format!("{validation_size} leaves no training inputs out of {n}") });
    }
    let perm = SplitMix64::new(seed).permutation(n);
    let mut val = perm[..validation_size].to_vec();
    let mut train = perm[validation_size..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

/// Reads `path`, or `path.gz` decompressed, whichever exists (plain first).
fn read_maybe_gz(kind: DatasetKind, path: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ModelError::Io { path: p, source }
    };
    if path.is_file() {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        Ok((path.to_path_buf(), bytes))
    } else if gz.is_file() {
        let file = std::fs::File::open(&gz).map_err(io_err(&gz))?;
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(file).read_to_end(&mut bytes).map_err(|e| ModelError::CorruptDataFile {
            path: gz.clone(),
            what: "gzip file".into(),
            reason: format!("decompression failed ({e})"),
            hint: format!("the file is damaged; reinstall the data ({})", kind.how_to_get()),
        })?;
        Ok((gz, bytes))
    } else {
        Err(ModelError::MissingDataFile { path: gz, hint: kind.how_to_get() })
    }
}

fn corrupt(kind: DatasetKind, path: &Path, what: &str, reason: String) -> ModelError {
    ModelError::CorruptDataFile {
        path: path.to_path_buf(),
        what: what.into(),
        reason,
        hint: format!("the file is damaged or not what its name says; reinstall the data ({})", kind.how_to_get()),
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Reads an IDX images file: returns (raw pixels, count, rows, cols).
pub fn read_idx_images(kind: DatasetKind, path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let (path, bytes) = read_maybe_gz(kind, path)?;
    let what = "IDX images file";
    if bytes.len() < 16 {
        return Err(corrupt(kind, &path, what, format!("it is truncated: {} bytes, shorter than the 16-byte header", bytes.len())));
    }
    let magic = be_u32(&bytes, 0);
    if magic != IDX_IMAGES_MAGIC {
        return Err(corrupt(kind, &path, what, format!("wrong magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} (unsigned bytes, 3 dimensions)")));
    }
    let (n, rows, cols) = (be_u32(&bytes, 4) as usize, be_u32(&bytes, 8) as usize, be_u32(&bytes, 12) as usize);
    let expected = n * rows * cols;
    let got = bytes.len() - 16;
    if got != expected {
        return Err(corrupt(
            kind,
            &path,
            what,
            format!("it is truncated or padded: the header promises {n} images of {rows}x{cols} ({expected} bytes of pixels), the file holds {got}"),
        ));
    }
    Ok((bytes[16..].to_vec(), n, rows, cols))
}

/// Reads an IDX labels file.
pub fn read_idx_labels(kind: DatasetKind, path: &Path) -> Result<Vec<u8>> {
    let (path, bytes) = read_maybe_gz(kind, path)?;
    let what = "IDX labels file";
    if bytes.len() < 8 {
        return Err(corrupt(kind, &path, what, format!("it is truncated: {} bytes, shorter than the 8-byte header", bytes.len())));
    }
    let magic = be_u32(&bytes, 0);
    if magic != IDX_LABELS_MAGIC {
        return Err(corrupt(kind, &path, what, format!("wrong magic number 0x{magic:08x}, expected 0x{IDX_LABELS_MAGIC:08x} (unsigned bytes, 1 dimension)")));
    }
    let n = be_u32(&bytes, 4) as usize;
    let got = bytes.len() - 8;
    if got != n {
        return Err(corrupt(kind, &path, what, format!("it is truncated or padded: the header promises {n} labels, the file holds {got}")));
    }
    let labels = bytes[8..].to_vec();
    if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
        return Err(corrupt(kind, &path, what, format!("label {bad} is out of range 0..10")));
    }
    Ok(labels)
}

fn read_idx_pair(kind: DatasetKind, dir: &Path, prefix: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte"));
    let (pixels, n, rows, cols) = read_idx_images(kind, &images_path)?;
    let shape = kind.input_shape();
    if (rows as i64, cols as i64) != (shape.height, shape.width) {
        return Err(corrupt(kind, &images_path, "IDX images file", format!("images are {rows}x{cols}, expected {}x{}", shape.height, shape.width)));
    }
    let labels = read_idx_labels(kind, &dir.join(format!("{prefix}-labels-idx1-ubyte")))?;
    if labels.len() != n {
        return Err(corrupt(kind, &images_path, "IDX images file", format!("it holds {n} images but its labels file holds {} labels", labels.len())));
    }
    Ok((pixels, labels))
}

/// Reads one CIFAR-10 binary batch: records of 1 label byte then 3072 pixel
/// bytes (1024 red, 1024 green, 1024 blue, row-major), i.e. already [C, H, W].
pub fn read_cifar_batch(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let kind = DatasetKind::Cifar10;
    if !path.is_file() {
        return Err(ModelError::MissingDataFile { path: path.to_path_buf(), hint: kind.how_to_get() });
    }
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let what = "CIFAR-10 binary batch";
    if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
        return Err(corrupt(kind, path, what, format!("its size {} is not a positive multiple of the {CIFAR_RECORD}-byte record (truncated?)", bytes.len())));
    }
    let n = bytes.len() / CIFAR_RECORD;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * (CIFAR_RECORD - 1));
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(corrupt(kind, path, what, format!("record {i} has label {}, outside 0..10", rec[0])));
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((pixels, labels))
}

/// The inputs a model is calibrated and evaluated on.
#[derive(Debug)]
pub struct ModelData {
    /// Held out of training: what temperatures and thresholds are fit on.
    pub validation: Split,
    pub test: Split,
    /// Where the validation inputs came from, in words (calibration files
    /// record it).
    pub validation_source: String,
    /// Where the test inputs came from, in words.
    pub test_source: String,
    /// The seed of the train/validation split, where a built-in dataset
    /// was split (0 for tensor files the user brought).
    pub split_seed: u64,
}

/// What a calibration file says of a built-in dataset's validation inputs.
pub const HELD_OUT: &str = "validation split held out of the training set";
