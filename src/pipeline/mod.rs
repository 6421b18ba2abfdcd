//! The whole FAPE-IR restoration pipeline on candle: the FLUX autoencoder ([`vae`]) and the
//! orchestration that runs planner, VAE and transformer on one image ([`restore`]).

pub mod restore;
pub mod standin;
pub mod vae;
pub mod flux;
pub mod weights;
