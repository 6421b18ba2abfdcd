pub mod flux;
pub mod weights;
