//! The jail each VM process enters before it touches guest input (being built under the
//! multi-tenant issue). So far: creating its directories so that nothing in them can have been
//! placed by anyone else.

pub mod dirs;
