//! Words every crate shares, as types checked in one place.
//!
//! - [`Exit`]: where an answer came from, a side branch (numbered from 1)
//!   or the final exit, which is named, never a number.
//! - [`PartitionBranch`]: the side branch where a device decides, numbered
//!   from 1 and at most the model's number of side branches.
//! - [`PTar`]: a confidence threshold. Its ranges are stated here once: a
//!   plan's p_tar lies in [0, 1] (0 keeps every input on the device, 1
//!   offloads every input: the planner's extremes); a target a person sets
//!   (a flag, a scenario, a fleet's start) lies strictly inside, (0, 1).
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::MessageError;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exit {
    /// Side branch k, numbered from 1.
    Branch(usize),
    /// The final exit, at the end of the network.
    Final,
}

impl Exit {
    /// Its slot in an exit list ordered branch 1, branch 2, ..., final, of
    /// a model with `branches` side branches.
    pub fn index(self, branches: usize) -> usize {
        match self {
            Exit::Branch(k) => k.saturating_sub(1).min(branches),
            Exit::Final => branches,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Branch(k) => write!(f, "branch{k}"),
            Exit::Final => f.write_str("final"),
        }
    }
}

/// A branch as its number, the final exit as `"final"`.
impl Serialize for Exit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Exit::Branch(k) => s.serialize_u64(*k as u64),
            Exit::Final => s.serialize_str("final"),
        }
    }
}

/// Also reads files written before the final exit had a name, which wrote
/// it as 0.
impl<'de> Deserialize<'de> for Exit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0) => Ok(Exit::Final),
            Raw::Number(k) => usize::try_from(k).map(Exit::Branch).map_err(serde::de::Error::custom),
            Raw::Name(n) if n == "final" => Ok(Exit::Final),
            Raw::Name(n) => Err(serde::de::Error::custom(format!("exit {n:?}: give a branch number or \"final\""))),
        }
    }
}

/// A partition branch: the side branch, numbered from 1, up to which a
/// device runs the network and where it decides to answer or offload; the
/// cloud runs the rest. Its rules are stated here once: it is at least 1
/// (`new`, and every way of reading one), and at most the model's number of
/// side branches (`within`, where the model is known). On the wire it is the
/// number, one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PartitionBranch(u8);

impl PartitionBranch {
    /// Side branch 1, which every early-exit model has.
    pub const FIRST: Self = Self(1);

    pub fn new(k: usize) -> Result<Self, MessageError> {
        match u8::try_from(k) {
            Ok(b) if b >= 1 => Ok(Self(b)),
            _ => Err(MessageError::PartitionBranch(k)),
        }
    }

    /// This branch, if a model with `branches` side branches has it.
    pub fn within(self, branches: usize) -> Result<Self, MessageError> {
        match self.get() <= branches {
            true => Ok(self),
            false => Err(MessageError::NoSuchBranch { branch: self.get(), branches }),
        }
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// The wire's one byte.
    pub fn byte(self) -> u8 {
        self.0
    }

    /// Its exit: the side branch's own.
    pub fn exit(self) -> Exit {
        Exit::Branch(self.get())
    }
}

impl std::fmt::Display for PartitionBranch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Reads a flag's value (`--partition-branch 2`).
impl std::str::FromStr for PartitionBranch {
    type Err = MessageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let k: usize = s.trim().parse().map_err(|_| MessageError::PartitionBranchText(s.to_string()))?;
        Self::new(k)
    }
}

impl<'de> Deserialize<'de> for PartitionBranch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = u64::deserialize(d)?;
        PartitionBranch::new(usize::try_from(k).unwrap_or(usize::MAX)).map_err(serde::de::Error::custom)
    }
}

/// A confidence threshold: an input stays on the device when its calibrated
/// branch confidence reaches it.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct PTar(f64);

impl PTar {
    /// A plan's threshold, in [0, 1].
    pub fn plan(value: f64) -> Result<Self, MessageError> {
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(MessageError::PTar(value))
        }
    }

    /// A target a person sets, in (0, 1): 0 and 1 are not targets but the
    /// planner's extremes (everything on the device, everything offloaded).
    pub fn target(value: f64) -> Result<Self, MessageError> {
        if value > 0.0 && value < 1.0 {
            Ok(Self(value))
        } else {
            Err(MessageError::PTarTarget(value))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for PTar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PTar::plan(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_branch_counts_from_one_and_stays_within_the_model() {
        assert_eq!(PartitionBranch::new(0), Err(MessageError::PartitionBranch(0)));
        assert_eq!(PartitionBranch::new(256), Err(MessageError::PartitionBranch(256)));
        let two = PartitionBranch::new(2).unwrap();
        assert_eq!((two.get(), two.byte(), two.exit(), two.to_string()), (2, 2u8, Exit::Branch(2), "2".to_string()));
        assert!(two.within(2).is_ok());
        assert_eq!(two.within(1), Err(MessageError::NoSuchBranch { branch: 2, branches: 1 }));
        assert_eq!("2".parse::<PartitionBranch>(), Ok(two));
        assert!("0".parse::<PartitionBranch>().is_err() && "two".parse::<PartitionBranch>().is_err());
        assert_eq!(serde_json::to_string(&two).unwrap(), "2");
        assert!(serde_json::from_str::<PartitionBranch>("0").unwrap_err().to_string().contains(">= 1"));
        assert_eq!(serde_json::from_str::<PartitionBranch>("1").unwrap().get(), 1);
    }

    #[test]
    fn the_final_exit_has_a_name_and_old_files_still_read() {
        assert_eq!(serde_json::to_string(&[Exit::Branch(2), Exit::Final]).unwrap(), r#"[2,"final"]"#);
        let read: Vec<Exit> = serde_json::from_str(r#"[1, "final", 0]"#).unwrap();
        assert_eq!(read, vec![Exit::Branch(1), Exit::Final, Exit::Final]);
        assert!(serde_json::from_str::<Exit>(r#""last""#).is_err());
        assert_eq!((Exit::Branch(2).index(3), Exit::Final.index(3), Exit::Branch(9).index(3)), (1, 3, 3));
        assert_eq!(format!("{} {}", Exit::Branch(1), Exit::Final), "branch1 final");
    }

    #[test]
    fn p_tar_ranges_are_stated_once() {
        for v in [0.0, 0.5, 1.0] {
            assert_eq!(PTar::plan(v).unwrap().get(), v);
        }
        for v in [-0.1, 1.1, f64::NAN] {
            assert!(PTar::plan(v).is_err(), "{v}");
        }
        assert!(PTar::target(0.9).is_ok());
        for v in [0.0, 1.0, f64::NAN, f64::INFINITY] {
            let e = PTar::target(v).unwrap_err().to_string();
            assert!(e.contains("(0, 1)"), "{v}: {e}");
        }
        assert!(serde_json::from_str::<PTar>("1.5").is_err());
    }
}
