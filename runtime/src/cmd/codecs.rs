//! `branchpoint codecs`: what each activation codec costs and keeps, per
//! partition branch, on the test split: bytes of one offload request,
//! agreement of the final exit's answer with the f32 activation's, the
//! final exit's accuracy, and the time to encode and to decode one input's
//! activation beside the head's own time (all timed here, one thread, in
//! one run, so the ratios hold on any machine).
//!
//! One more row measures int8 with one scale for the whole activation
//! instead of one per channel, to show why the codec scales per channel.
use std::time::Instant;

use anyhow::{Context, Result};
use branchpoint_core::calibration::ExitLogits;
use branchpoint_messages::Codec;
use branchpoint_models::data::Split;
use branchpoint_models::model::{codec_final_logits_with, recorded_codec_final_logits, recorded_split_exit_logits};
use branchpoint_models::Model;
use serde::Serialize;

use crate::cli::CodecsArgs;
use crate::scenario::upload_bytes;

#[derive(Debug, Serialize)]
pub struct CodecReport {
    pub model: String,
    #[serde(alias = "sha256")]
    pub model_sha256: String,
    pub test_inputs: usize,
    pub timed_inputs: usize,
    pub torch_threads: i32,
    pub branches: Vec<BranchCodecs>,
}

#[derive(Debug, Serialize)]
pub struct BranchCodecs {
    pub branch: usize,
    /// The head's median time for one input, µs (what the device spends
    /// before it can encode).
    pub head_us: f64,
    pub codecs: Vec<CodecRow>,
}

#[derive(Debug, Serialize)]
pub struct CodecRow {
    /// "f32", "f16", "int8", or "int8-per-tensor" (for comparison only).
    pub codec: String,
    /// One offload request on the wire, framing included.
    pub bytes_per_offload: f64,
    pub bytes_vs_f32: f64,
    /// Test inputs whose final-exit class matches the f32 activation's.
    pub agreement_with_f32: f64,
    /// Final exit's accuracy when every test input is offloaded here.
    pub final_accuracy: f64,
    /// Median per input, µs.
    pub encode_us: f64,
    pub decode_us: f64,
    /// (encode + decode) / head.
    pub share_of_head: f64,
}

pub fn run(args: CodecsArgs) -> Result<()> {
    // One thread, as a device's inference thread and `profile` time it.
    tch::set_num_threads(1);
    let model = args.source.load_model(tch::Device::Cpu)?;
    let data = args.source.load_data(&model)?;
    let test = &data.test;
    let f32_final = recorded_split_exit_logits(&model, test)?.pop().context("a model has a final exit")?;
    let bytes = upload_bytes(model.partition_points())?;
    let timed = args.timed_inputs.clamp(1, test.len());
    let mut branches = Vec::new();
    let per_codec: Vec<(Codec, Vec<ExitLogits>)> = [Codec::F16, Codec::Int8].into_iter().map(|c| Ok((c, recorded_codec_final_logits(&model, test, c)?))).collect::<Result<_>>()?;
    let per_tensor = codec_final_logits_with(&model, test, "int8 per tensor", |shape, values, out| {
        let n: u32 = shape.iter().product();
        Codec::Int8.round_trip_into(&[1, n], values, out)
    })?;
    for k in 1..=model.num_branches() {
        let (head_us, activations) = time_heads(&model, test, k, timed)?;
        let mut rows = Vec::new();
        let answers = |c: Codec| -> &ExitLogits {
            match c {
                Codec::F32 => &f32_final,
                c => &per_codec.iter().find(|(pc, _)| *pc == c).expect("measured above").1[k - 1],
            }
        };
        let mut row = |name: &str, codec: Codec, finals: &ExitLogits, per_tensor: bool| -> Result<()> {
            let (encode_us, decode_us) = time_codec(codec, &activations, per_tensor)?;
            // One scale and zero point instead of one per channel: 5 bytes
            // of scale and 1 of zero point fewer per channel but one.
            let channels = activations.first().and_then(|(shape, _)| shape.get(1)).map_or(1.0, |&c| f64::from(c));
            let b = if per_tensor { bytes[k - 1].of(codec) - 6.0 * (channels - 1.0) } else { bytes[k - 1].of(codec) };
            rows.push(CodecRow {
                codec: name.into(),
                bytes_per_offload: b,
                bytes_vs_f32: b / bytes[k - 1].f32,
                agreement_with_f32: agreement(finals, &f32_final),
                final_accuracy: accuracy(finals),
                encode_us,
                decode_us,
                share_of_head: (encode_us + decode_us) / head_us,
            });
            Ok(())
        };
        for c in Codec::ALL {
            row(c.name(), c, answers(c), false)?;
        }
        row("int8-per-tensor", Codec::Int8, &per_tensor[k - 1], true)?;
        branches.push(BranchCodecs { branch: k, head_us, codecs: rows });
    }
    let report = CodecReport {
        model: args.source.model.display().to_string(),
        model_sha256: model.sha256().to_string(),
        test_inputs: test.len(),
        timed_inputs: timed,
        torch_threads: tch::get_num_threads(),
        branches,
    };
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(())
}

fn print(r: &CodecReport) {
    println!("{} on {} test inputs; times: median of {} inputs, one at a time, {} torch thread(s)", r.model, r.test_inputs, r.timed_inputs, r.torch_threads);
    println!("  {:<7} {:<16} {:>9} {:>8} {:>10} {:>9} {:>10} {:>10} {:>9}", "branch", "codec", "bytes", "vs f32", "agreement", "accuracy", "encode us", "decode us", "of head");
    for b in &r.branches {
        for c in &b.codecs {
            println!(
                "  {:<7} {:<16} {:>9.0} {:>7.3}x {:>9.2}% {:>8.2}% {:>10.1} {:>10.1} {:>8.2}%",
                b.branch,
                c.codec,
                c.bytes_per_offload,
                c.bytes_vs_f32,
                100.0 * c.agreement_with_f32,
                100.0 * c.final_accuracy,
                c.encode_us,
                c.decode_us,
                100.0 * c.share_of_head
            );
        }
        println!("  {:<7} head: {:.1} us per input", b.branch, b.head_us);
    }
}

/// Share of inputs whose class is the label.
fn accuracy(a: &ExitLogits) -> f64 {
    let right = (0..a.len()).filter(|&i| a.predict(i, 1.0).0 as i64 == a.labels[i]).count();
    right as f64 / a.len().max(1) as f64
}

/// Share of inputs whose final class is the same in both.
fn agreement(a: &ExitLogits, b: &ExitLogits) -> f64 {
    let n = a.len().min(b.len());
    let same = (0..n).filter(|&i| a.predict(i, 1.0).0 == b.predict(i, 1.0).0).count();
    same as f64 / n.max(1) as f64
}

/// The head's median time on `n` test inputs one at a time, and their
/// activations (shape, values).
#[allow(clippy::type_complexity)]
fn time_heads(model: &Model, test: &Split, branch: usize, n: usize) -> Result<(f64, Vec<(Vec<u32>, Vec<f32>)>)> {
    let mut times = Vec::with_capacity(n);
    let mut activations = Vec::with_capacity(n);
    for i in 0..n as i64 {
        let x = test.images.narrow(0, i, 1).to_device(model.device());
        let started = Instant::now();
        let (_, a) = model.head(branch, &x)?;
        let a = a.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous();
        times.push(started.elapsed().as_secs_f64() * 1e6);
        let shape = a.size().iter().map(|&d| d as u32).collect();
        activations.push((shape, Vec::<f32>::try_from(a.flatten(0, -1))?));
    }
    Ok((median(&mut times), activations))
}

/// Median encode and decode time per activation, µs.
fn time_codec(codec: Codec, activations: &[(Vec<u32>, Vec<f32>)], per_tensor: bool) -> Result<(f64, f64)> {
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    for (shape, values) in activations {
        let shape = if per_tensor { vec![1, values.len() as u32] } else { shape.clone() };
        let started = Instant::now();
        let tensor = codec.encode(&shape, values)?;
        enc.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        let back = tensor.to_f32_vec()?;
        dec.push(started.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(back);
    }
    Ok((median(&mut enc), median(&mut dec)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
