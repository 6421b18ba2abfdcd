//! The restoration pipeline around the kernels (issue #6): images in and out ([`image`]), the
//! built-in label-free planner that reads an image and writes FAPE-IR's plan line
//! ([`planner`]), the seeded synthetic degradations and clean scenes its accuracy is measured on
//! ([`degrade`], [`scenes`]), the frequency split rendered for display ([`split`]), the small
//! spatial filters they share ([`filters`]), the FLUX-shaped one-step executor ([`flux`]) with its
//! checked and synthetic weights ([`weights`]), the FLUX autoencoder ([`vae`]), and the
//! orchestration that runs planner, VAE and transformer on one image ([`restore`]).

pub mod degrade;
pub mod filters;
pub mod flux;
pub mod image;
pub mod planner;
pub mod restore;
pub mod scenes;
pub mod split;
pub mod vae;
pub mod weights;
