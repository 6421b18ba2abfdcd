//! The restoration pipeline around the kernels (issue #6): images in and out ([`image`]).

pub mod image;
