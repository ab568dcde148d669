//! A network's answers as plain numbers: the bridge from tensors to the pure
//! core, which takes a model as its recorded logits (`ExitLogits`).
use std::path::PathBuf;

use branchpoint_core::calibration::ExitLogits;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::data::Split;
use crate::error::Result;

/// From a [n, classes] float tensor and [n] label tensor.
pub fn exit_logits(logits: &Tensor, labels: &Tensor) -> Result<ExitLogits> {
    let size = logits.size();
    let classes = *size.last().unwrap_or(&0) as usize;
    let flat: Vec<f32> = Vec::try_from(logits.to_kind(Kind::Float).flatten(0, -1))?;
    let labels: Vec<i64> = Vec::try_from(labels.to_kind(Kind::Int64))?;
    Ok(ExitLogits::new(classes, flat, labels)?)
}

/// Where a network's answers are recorded: `$BRANCHPOINT_CACHE_DIR/answers`,
/// else `$XDG_CACHE_HOME/branchpoint/answers`, else
/// `$HOME/.cache/branchpoint/answers`. `BRANCHPOINT_CACHE_DIR=""` turns
/// recording off.
pub fn answers_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k);
    let base = match var("BRANCHPOINT_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => match var("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("branchpoint"),
            None => PathBuf::from(var("HOME").filter(|d| !d.is_empty())?).join(".cache").join("branchpoint"),
        },
    };
    Some(base.join("answers"))
}

/// The model's answers on a split, recorded once per (model, inputs):
/// a replay, a calibration and an evaluation of the same model on the same
/// inputs compute its forward passes once, not each time (15,000 forward
/// passes are most of a replay's time). The record is keyed by the SHA-256
/// of the model's digest (`Model::sha256`) and the split's bytes, so other
/// models or other inputs (another seed, a corruption) never read it; a record that is
/// unreadable or does not match is computed again and replaced. Recording
/// is best effort: a cache that cannot be written costs time, never the
/// answer.
///
/// `compute` gives the answers when there is no record; `model_sha256`
/// names the model and what is asked of it: its SHA-256 for its exits
/// (`model::recorded_split_exit_logits` is the usual caller), more words for
/// other answers (`model::recorded_codec_final_logits`).
pub fn recorded(model_sha256: &str, split: &Split, compute: impl FnOnce() -> Result<Vec<ExitLogits>>) -> Result<Vec<ExitLogits>> {
    recorded_in(answers_dir(), model_sha256, split, compute)
}

/// `recorded`, with the answers directory given (`None`: no recording).
fn recorded_in(dir: Option<PathBuf>, model_sha256: &str, split: &Split, compute: impl FnOnce() -> Result<Vec<ExitLogits>>) -> Result<Vec<ExitLogits>> {
    let Some(dir) = dir else { return compute() };
    let key = answers_key(model_sha256, split)?;
    let path = dir.join(format!("{key}.answers"));
    let read = || std::fs::read(&path).ok().and_then(|bytes| decode_answers(&bytes, &key)).filter(|answers| answers.first().is_some_and(|e| e.len() == split.len()));
    if let Some(answers) = read() {
        return Ok(answers);
    }
    // Processes started together (a stack's calibrator, planner and fleet; a
    // test suite) would each compute the same answers: the first to take the
    // record's lock computes, the others wait and read its record. The OS
    // drops the lock of a process that dies; without a lock file (a
    // read-only cache) everyone computes.
    let _lock = std::fs::create_dir_all(&dir).and_then(|()| std::fs::File::create(dir.join(format!("{key}.lock")))).and_then(|f| f.lock().map(|()| f)).ok();
    if let Some(answers) = read() {
        return Ok(answers);
    }
    let answers = compute()?;
    let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&tmp, encode_answers(&answers, &key))).and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(answers)
}

const ANSWERS_MAGIC: &[u8] = b"branchpoint answers v1\n";

/// SHA-256 of the weights' digest, the images' shape and bytes and the
/// labels, in hex.
fn answers_key(model_sha256: &str, split: &Split) -> Result<String> {
    let mut h = Sha256::new();
    h.update(ANSWERS_MAGIC);
    h.update(model_sha256.as_bytes());
    for d in split.images.size() {
        h.update(d.to_le_bytes());
    }
    let images: Vec<f32> = Vec::try_from(split.images.to_kind(Kind::Float).contiguous().flatten(0, -1))?;
    let labels: Vec<i64> = Vec::try_from(split.labels.to_kind(Kind::Int64))?;
    // Little-endian bytes, hashed in bulk: one call per value cost a
    // replay's start more than the rest of the key.
    if cfg!(target_endian = "little") {
        h.update(bytemuck::cast_slice::<f32, u8>(&images));
        h.update(bytemuck::cast_slice::<i64, u8>(&labels));
    } else {
        images.iter().for_each(|v| h.update(v.to_le_bytes()));
        labels.iter().for_each(|y| h.update(y.to_le_bytes()));
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Magic, key, exits; per exit: classes (u32), inputs (u64), logits (f32),
/// labels (i64), all little-endian.
fn encode_answers(answers: &[ExitLogits], key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANSWERS_MAGIC.len() + 64 + answers.iter().map(|e| e.logits.len() * 4 + e.labels.len() * 8 + 12).sum::<usize>());
    out.extend_from_slice(ANSWERS_MAGIC);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(answers.len() as u32).to_le_bytes());
    for e in answers {
        out.extend_from_slice(&(e.classes as u32).to_le_bytes());
        out.extend_from_slice(&(e.labels.len() as u64).to_le_bytes());
        e.logits.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        e.labels.iter().for_each(|y| out.extend_from_slice(&y.to_le_bytes()));
    }
    out
}

fn decode_answers(bytes: &[u8], key: &str) -> Option<Vec<ExitLogits>> {
    let mut rest = bytes.strip_prefix(ANSWERS_MAGIC)?.strip_prefix(key.as_bytes())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let exits = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut answers = Vec::with_capacity(exits.min(64));
    for _ in 0..exits {
        let classes = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let n = usize::try_from(u64::from_le_bytes(take(8)?.try_into().ok()?)).ok()?;
        let logits = take(n.checked_mul(classes)?.checked_mul(4)?)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let labels = take(n.checked_mul(8)?)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        answers.push(ExitLogits::new(classes, logits, labels).ok()?);
    }
    rest.is_empty().then_some(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_damage_is_refused() {
        let answers = vec![ExitLogits::new(2, vec![1.0, -1.0, 0.5, 0.25], vec![0, 1]).unwrap(), ExitLogits::new(3, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![2, 0]).unwrap()];
        let bytes = encode_answers(&answers, "k");
        assert_eq!(decode_answers(&bytes, "k"), Some(answers));
        assert_eq!(decode_answers(&bytes, "other key"), None, "another key never reads the record");
        assert_eq!(decode_answers(&bytes[..bytes.len() - 1], "k"), None, "truncated");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_answers(&longer, "k"), None, "trailing bytes");
        let mut bad_label = bytes.clone();
        let last = bad_label.len() - 8;
        bad_label[last] = 9;
        assert_eq!(decode_answers(&bad_label, "k"), None, "a label outside the classes");
    }

    #[test]
    fn callers_started_together_compute_once() {
        let dir = std::env::temp_dir().join(format!("branchpoint-answers-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Tensors are not shared between threads: each caller builds the
        // same split.
        let split = || Split { images: Tensor::from_slice(&[0.5f32, 1.5]).reshape([2, 1, 1, 1]), labels: Tensor::from_slice(&[1i64, 0]) };
        let answers = vec![ExitLogits::new(2, vec![1.0, -1.0, 0.5, 0.25], vec![1, 0]).unwrap()];
        let computed = std::sync::atomic::AtomicUsize::new(0);
        let (second_computes, first_sees) = std::sync::mpsc::channel::<()>();
        let (dir, answers, computed) = (&dir, &answers, &computed);
        let results: Vec<Vec<ExitLogits>> = std::thread::scope(|s| {
            let first = s.spawn(move || {
                recorded_in(Some(dir.clone()), "model", &split(), || {
                    computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Hold the computation open while the second caller
                    // starts. With the lock it waits and never computes, so
                    // this waits out the bound; without it, it computes too
                    // and the count below fails. The bound only limits how
                    // surely a missing lock is caught, never the result of a
                    // correct one.
                    let _ = first_sees.recv_timeout(std::time::Duration::from_millis(500));
                    Ok(answers.clone())
                })
            });
            while computed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let second = s.spawn(move || {
                recorded_in(Some(dir.clone()), "model", &split(), || {
                    computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = second_computes.send(());
                    Ok(answers.clone())
                })
            });
            vec![first.join().unwrap().unwrap(), second.join().unwrap().unwrap()]
        });
        assert_eq!(results, vec![answers.clone(), answers.clone()]);
        assert_eq!(computed.load(std::sync::atomic::Ordering::SeqCst), 1, "the second caller read the first one's record");
        let _ = std::fs::remove_dir_all(dir);
    }
}
