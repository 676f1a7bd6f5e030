//! The jail each VM process enters before it touches guest input (being built under the
//! multi-tenant issue). So far: its directories, made so that nothing in them can have been
//! placed by anyone else, and its cgroup with CPU, memory and pids limits.

pub mod cgroup;
pub mod dirs;
