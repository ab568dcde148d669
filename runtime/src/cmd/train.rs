//! `branchpoint train`: joint training of all exits, weights + model card.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use branchpoint_models::card::{card_path, load_weights, sha256_file, DatasetCard, ModelCard, NamedExitMetrics, TrainingCard};
use branchpoint_models::metrics::exit_metrics;
use branchpoint_models::model::recorded_split_exit_logits;
use branchpoint_models::train::{train, TrainConfig};
use branchpoint_models::{Dataset, DatasetKind, EarlyExitNet, LoadedModel, Model};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn;

use crate::cli::TrainArgs;
use crate::{parse_device, set_threads};

pub fn run(args: TrainArgs) -> Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("--out {}: the weights file must end in .safetensors", args.out.display());
    }
    let kind = DatasetKind::parse(&args.dataset)?;
    let device = parse_device(&args.compute.device)?;
    set_threads(args.compute.threads)?;
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        bail!("--weight-decay {}: give a non-negative number", args.weight_decay);
    }

    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(device);
    let net = EarlyExitNet::build(&vs.root(), &args.architecture, kind.input_shape(), kind.num_classes()).context("--architecture")?;
    let branches = net.num_branches();
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        exit_weights: args.exit_weights.clone().unwrap_or_else(|| std::iter::repeat_n(0.5, branches).chain([1.0]).collect()),
        seed: args.seed,
        augment: !args.no_augment,
    };
    cfg.validate(net.architecture().num_exits()).context("--exit-weights")?;
    let exit_names = net.architecture().exit_names();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| kind.default_dir());
    tracing::info!("loading {} from {}", kind.name(), data_dir.display());
    let data = Dataset::load(kind, &data_dir, args.validation_size, args.split_seed)?;
    let train_split = match args.subset {
        Some(n) => data.train.head(n),
        None => data.train.head(data.train.len()),
    };
    tracing::info!("split (seed {}): {} train ({} used), {} validation, {} test", data.split.seed, data.split.train, train_split.len(), data.split.validation, data.split.test);

    let batches = train_split.len().div_ceil(cfg.batch_size) as u64;
    let bar = ProgressBar::new(batches);
    bar.set_style(ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} batches  {msg}  ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
    let started = Instant::now();
    let history = train(
        &net,
        &vs,
        &train_split,
        &data.validation,
        &kind.normalization(),
        &cfg,
        |p| {
            if p.batch == 1 {
                bar.reset();
                bar.set_prefix(format!("{}/{}", p.epoch, p.epochs));
            }
            bar.set_position(p.batch as u64);
            bar.set_message(format!("loss {:.4}  train acc {:.2} %", p.loss, 100.0 * p.accuracy));
        },
        |e| {
            let val: Vec<String> = exit_names.iter().zip(&e.validation).map(|(n, m)| format!("{n} {:.2} %", 100.0 * m.accuracy)).collect();
            let line = format!("epoch {:>2}: loss {:.4}, train acc {:.2} %; validation: {}", e.epoch, e.loss, 100.0 * e.train_accuracy, val.join(", "));
            // A hidden bar (stderr not a terminal: CI, logs) drops println.
            if bar.is_hidden() {
                tracing::info!("{line}");
            } else {
                bar.println(line);
            }
        },
    )?;
    bar.finish_and_clear();
    let duration_s = started.elapsed().as_secs_f64();
    // Flushing keeps training from making subnormals, but a weights file
    // must hold none on any machine: zero what is left before measuring
    // and saving, so the card describes exactly the file.
    let zeroed = branchpoint_models::subnormal::zero_subnormal_weights(&vs);
    if zeroed > 0 {
        tracing::info!("zeroed {zeroed} subnormal weights before saving");
    }

    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    vs.save(&args.out).with_context(|| format!("writing weights to {}", args.out.display()))?;
    let card = ModelCard {
        weights: args.out.file_name().expect("--out has a file name").to_string_lossy().into_owned(),
        model_sha256: sha256_file(&args.out)?,
        architecture: net.architecture().clone(),
        dataset: DatasetCard { name: kind, normalization: kind.normalization(), split: data.split.clone() },
        training: TrainingCard { config: cfg, optimizer: "adam, cosine-decayed learning rate".into(), torch_threads: tch::get_num_threads(), duration_s, history },
        test_metrics: Vec::new(),
    };
    // The card's test metrics come from the weights as read back from the
    // file, through the same recorded answers `evaluate`, `calibrate` and
    // `run` read: the first of them after training does not run the test
    // set again.
    let mut vs = nn::VarStore::new(device);
    let reread = EarlyExitNet::build(&vs.root(), &args.architecture, kind.input_shape(), kind.num_classes())?;
    load_weights(&mut vs, &args.out)?;
    let mut model = Model::Builtin(Box::new(LoadedModel { net: reread, vs, card, weights_path: args.out.clone() }));
    let test_answers = recorded_split_exit_logits(&model, &data.test)?;
    let Model::Builtin(loaded) = &mut model else { unreachable!("built above") };
    let card = &mut loaded.card;
    card.test_metrics = exit_names
        .iter()
        .zip(&test_answers)
        .map(|(name, e)| {
            let z = tch::Tensor::from_slice(&e.logits).view([e.len() as i64, e.classes as i64]);
            NamedExitMetrics { exit: name.clone(), metrics: exit_metrics(&z, &data.test.labels) }
        })
        .collect();
    let card_file = card_path(&args.out);
    card.write(&card_file)?;

    println!("trained in {duration_s:.0} s; test set ({} inputs):", data.split.test);
    for m in &card.test_metrics {
        println!("  {:<9} accuracy {:6.2} %  NLL {:.4}  ECE {:.4}", m.exit, 100.0 * m.metrics.accuracy, m.metrics.nll, m.metrics.ece);
    }
    println!("weights: {}\nmodel card: {}", args.out.display(), card_file.display());
    Ok(())
}
