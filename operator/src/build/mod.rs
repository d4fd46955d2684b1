//! Desired objects as pure functions of a spec: no client, no clock. The
//! controllers apply what these return, and most of the operator's tests are
//! plain unit tests of them.

pub mod geocluster;
pub mod regiongroup;
