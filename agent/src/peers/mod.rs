//! Where peers come from: the Kubernetes API, or a file.

pub mod file;
pub mod kube;
pub mod publish;
pub mod validate;
