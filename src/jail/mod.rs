//! The jail each VM process enters before it touches guest input (being built under the
//! multi-tenant issue). So far: its directories, made so that nothing in them can have been
//! placed by anyone else; its cgroup with CPU, memory and pids limits; and dropping root, every
//! capability and the means to regain them.

pub mod cgroup;
pub mod dirs;
pub mod privileges;
