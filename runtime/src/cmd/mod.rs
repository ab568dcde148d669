//! One file per subcommand: parse nothing (clap did), do the work, print.
pub mod calibrate;
pub mod calibrator;
pub mod codecs;
pub mod evaluate;
pub mod fleet;
pub mod nats_config;
pub mod planner;
pub mod profile;
pub mod run;
pub mod serve;
pub mod stack;
pub mod trace;
pub mod train;
pub mod worker;
