//! The restoration pipeline around the kernels (issue #6): images in and out ([`image`]), the
//! built-in label-free planner that reads an image and writes FAPE-IR's plan line
//! ([`planner`]), the seeded synthetic degradations and clean scenes its accuracy is measured on
//! ([`degrade`], [`scenes`]), the frequency split rendered for display ([`split`]), and the
//! small spatial filters they share ([`filters`]).

pub mod degrade;
pub mod filters;
pub mod image;
pub mod planner;
pub mod scenes;
pub mod split;
