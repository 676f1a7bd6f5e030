//! Giving back memory a long-lived process touched only while it started. A supervisor or VM
//! process lives as long as its VM, and what its start-up left resident (parsed settings freed
//! but kept by malloc, stack pages a deep call once reached) stays counted against every VM for
//! its whole life; the Firecracker personality's clones, three processes each, held 244 KiB of
//! supervisor heap and 60-88 KiB of main-thread stack each, where a loop needs a fraction.

/// Gives the heap's free pages back to the kernel (malloc_trim). Cheap; call once set-up is
/// over, before a process's steady loop (and before a fork, so the child does not copy them).
/// musl's allocator returns freed groups by itself and has no trim: nothing to do there.
pub fn trim_heap() {
    // SAFETY: malloc_trim takes no pointer and only releases free heap memory.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Room left below this function's own frame: what it and the calls it makes may still use
/// while the rest is given back.
const MARGIN: usize = 16 << 10;

/// Gives back the main thread's stack pages below the caller, which no frame uses any more
/// (a deeper call later faults fresh zero pages in). Does nothing on another thread's stack,
/// or when /proc/self/maps can not be read. Must be called before a seccomp filter that
/// forbids opening files.
#[inline(never)]
pub fn release_spent_stack() {
    if let Some(stack) = main_stack() {
        release_below_caller(stack);
    }
}

/// Gives back the pages of `stack` (its low and high address) below the caller's frame, less
/// a margin; nothing when this function's frame is not on `stack`.
#[inline(never)]
fn release_below_caller((low, high): (usize, usize)) {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    if !(low..high).contains(&here) {
        return;
    }
    let end = here.saturating_sub(MARGIN) & !(page_size() - 1);
    if end <= low {
        return;
    }
    // SAFETY: [low, end) lies in the stack mapping this frame is on, below every live frame
    // (this one is above `end`, with MARGIN for the madvise call); a page given back reads as
    // zeros when next touched, which is what a fresh stack page is.
    unsafe { libc::madvise(low as *mut libc::c_void, end - low, libc::MADV_DONTNEED) };
}

fn page_size() -> usize {
    // SAFETY: sysconf with a constant name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// The `[stack]` mapping of /proc/self/maps: the main thread's stack. Read into a buffer on
/// the stack in one call where it fits (a VMM's maps are 2-3 KiB): a growing `String` took
/// eight reads and as many reallocations, in both processes of every VM.
fn main_stack() -> Option<(usize, usize)> {
    use std::io::Read;
    let mut file = std::fs::File::open("/proc/self/maps").ok()?;
    let mut buf = [0u8; 16 << 10];
    let mut len = 0;
    while let Some(rest) = buf.get_mut(len..).filter(|r| !r.is_empty()) {
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    if len == buf.len() {
        // Longer than the buffer: read it all.
        let mut all = buf.to_vec();
        file.read_to_end(&mut all).ok()?;
        return stack_line(&String::from_utf8_lossy(&all));
    }
    stack_line(&String::from_utf8_lossy(buf.get(..len)?))
}

/// The `[stack]` line's range in the text of a maps file.
fn stack_line(maps: &str) -> Option<(usize, usize)> {
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    let range = line.split_whitespace().next()?;
    let (low, high) = range.split_once('-')?;
    Some((
        usize::from_str_radix(low, 16).ok()?,
        usize::from_str_radix(high, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resident KiB of the mapping that holds `addr`.
    fn resident_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((low, high)) = first.split_once('-') {
                if let (Ok(low), Ok(high)) = (
                    usize::from_str_radix(low, 16),
                    usize::from_str_radix(high, 16),
                ) {
                    inside = (low..high).contains(&addr);
                    continue;
                }
            }
            if let (true, Some(kib)) = (inside, line.strip_prefix("Rss:")) {
                return kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// This thread's stack, as pthread knows it (a test runs on a thread of its own).
    fn this_thread_stack() -> (usize, usize) {
        // SAFETY: pthread_attr_t is plain data that pthread_getattr_np fills; the attribute
        // is destroyed after its stack is read.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
            let mut base: *mut libc::c_void = std::ptr::null_mut();
            let mut size = 0usize;
            assert_eq!(libc::pthread_attr_getstack(&attr, &mut base, &mut size), 0);
            libc::pthread_attr_destroy(&mut attr);
            (base as usize, base as usize + size)
        }
    }

    #[inline(never)]
    fn touch_deep(depth: usize) -> u8 {
        let mut page = [0u8; 4096];
        page[depth % 4096] = depth as u8;
        let below = if depth == 0 { 0 } else { touch_deep(depth - 1) };
        std::hint::black_box(&mut page)[depth % 4096].wrapping_add(below)
    }

    #[test]
    fn stack_pages_a_deep_call_left_behind_are_given_back_and_the_stack_still_works() {
        let stack = std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(|| {
                let stack = this_thread_stack();
                let here = std::hint::black_box(&stack) as *const _ as usize;
                std::hint::black_box(touch_deep(128));
                let before = resident_kib_at(here);
                release_below_caller(stack);
                let after = resident_kib_at(here);
                // Deep again, on the pages given back: they come back as fresh ones.
                let again = touch_deep(128);
                (before, after, again)
            })
            .unwrap()
            .join()
            .unwrap();
        let (before, after, again) = stack;
        assert!(
            before >= 512,
            "the deep call left only {before} KiB resident"
        );
        assert!(
            after + 448 <= before,
            "{before} KiB resident before, {after} KiB after"
        );
        assert_eq!(again, touch_deep_sum(128));
    }

    fn touch_deep_sum(depth: usize) -> u8 {
        (0..=depth).fold(0u8, |sum, d| sum.wrapping_add(d as u8))
    }

    #[test]
    fn a_stack_this_frame_is_not_on_is_left_alone() {
        let mut other = vec![1u8; 64 << 10];
        let range = (
            other.as_ptr() as usize,
            other.as_ptr() as usize + other.len(),
        );
        release_below_caller(range);
        assert!(other.iter().all(|&b| b == 1));
        other[0] = 2;
    }

    #[test]
    fn the_main_stack_is_found_in_this_processs_maps() {
        let (low, high) = main_stack().expect("a [stack] line");
        assert!(low < high && high - low >= 4096, "{low:#x}-{high:#x}");
        let text = "7ffc1000-7ffc5000 rw-p 00000000 00:00 0                          [stack]\n\
                    7ffc6000-7ffc8000 r--p 00000000 00:00 0                          [vvar]\n";
        assert_eq!(stack_line(text), Some((0x7ffc_1000, 0x7ffc_5000)));
        assert_eq!(
            stack_line("7ffc6000-7ffc8000 r--p 0 00:00 0 [vvar]\n"),
            None
        );
    }
}
