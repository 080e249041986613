/* Records every call to glibc's allocator in a process, for heap_replay.py.
 *
 * Preloaded (LD_PRELOAD) into a worker, it wraps malloc, calloc, realloc, free and the
 * aligned allocators around glibc's own (__libc_*) and appends one 32-byte record per
 * call to HEAP_REPLAY_TRACE.<pid> (a child process records nothing). The worker calls
 * heap_replay_mark(n) through ctypes to put markers in the trace (the steps' start and
 * end, each backward pass's start and end); between markers 1 and 2, with
 * HEAP_REPLAY_BACKTRACES set, every block's call stack (return addresses, 24 at most)
 * goes to that file as well. The recorder allocates nothing itself: the heap it
 * records is the heap the process would have without it.
 *
 * Record: {op | thread id << 8, a, b, c}; op 1 malloc (a = block, b = size), 2 free
 * (a), 3 calloc (a, b = bytes), 4 realloc (a = old block, b = size, c = new block),
 * 5 aligned (a, b = size, c = alignment), 6 marker (b = its number).
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

typedef struct { uint64_t op, a, b, c; } record_t;

static int trace_fd = -2, owner = 0, stacks_fd = -1, stacks_on = 0;
static record_t buffer[4096];
static int used = 0;
static volatile int lock = 0;
static __thread int in_backtrace = 0;

static void flush(void) {
  if (trace_fd >= 0 && used) {
    const char *p = (const char *)buffer;
    size_t left = used * sizeof(record_t);
    while (left) {
      ssize_t n = write(trace_fd, p, left);
      if (n <= 0) break;
      p += n; left -= n;
    }
  }
  used = 0;
}

static void record(uint64_t op, uint64_t a, uint64_t b, uint64_t c) {
  if (trace_fd == -2) {
    const char *path = getenv("HEAP_REPLAY_TRACE");
    trace_fd = -1;
    if (path) {
      char name[4096];
      snprintf(name, sizeof name, "%s.%d", path, (int)getpid());
      trace_fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      owner = getpid();
    }
  }
  if (trace_fd < 0) return;
  if (getpid() != owner) { trace_fd = -1; return; }     /* a forked child */
  while (__sync_lock_test_and_set(&lock, 1)) {}
  buffer[used].op = op | ((uint64_t)gettid() << 8);
  buffer[used].a = a; buffer[used].b = b; buffer[used].c = c;
  if (++used == 4096) flush();
  __sync_lock_release(&lock);
}

static void stack(uint64_t block, uint64_t size) {
  if (!stacks_on || in_backtrace) return;
  in_backtrace = 1;
  void *frames[24];
  int depth = backtrace(frames, 24);
  uint64_t out[27] = {block, size, (uint64_t)depth};
  for (int i = 0; i < depth; ++i) out[3 + i] = (uint64_t)frames[i];
  if (write(stacks_fd, out, sizeof out) != sizeof out) stacks_on = 0;
  in_backtrace = 0;
}

void *malloc(size_t size) {
  void *p = __libc_malloc(size);
  record(1, (uint64_t)p, size, 0); stack((uint64_t)p, size);
  return p;
}
void free(void *p) {
  if (p) record(2, (uint64_t)p, 0, 0);
  __libc_free(p);
}
void *calloc(size_t n, size_t size) {
  void *p = __libc_calloc(n, size);
  record(3, (uint64_t)p, n * size, 0); stack((uint64_t)p, n * size);
  return p;
}
void *realloc(void *old, size_t size) {
  void *p = __libc_realloc(old, size);
  record(4, (uint64_t)old, size, (uint64_t)p);
  return p;
}
void *memalign(size_t alignment, size_t size) {
  void *p = __libc_memalign(alignment, size);
  record(5, (uint64_t)p, size, alignment); stack((uint64_t)p, size);
  return p;
}
void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }
int posix_memalign(void **out, size_t alignment, size_t size) {
  void *p = memalign(alignment, size);
  if (!p) return 12;  /* ENOMEM */
  *out = p;
  return 0;
}
void *valloc(size_t size) { return memalign(4096, size); }
void *pvalloc(size_t size) { return memalign(4096, (size + 4095) & ~(size_t)4095); }

void heap_replay_mark(int number) {
  if (number == 1 && getenv("HEAP_REPLAY_BACKTRACES")) {
    void *frames[4];
    in_backtrace = 1; backtrace(frames, 4); in_backtrace = 0;   /* loads the unwinder */
    stacks_fd = open(getenv("HEAP_REPLAY_BACKTRACES"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    stacks_on = stacks_fd >= 0;
  }
  if (number == 2) stacks_on = 0;
  record(6, 0, (uint64_t)number, 0);
  while (__sync_lock_test_and_set(&lock, 1)) {}
  flush();
  __sync_lock_release(&lock);
}

__attribute__((destructor)) static void finish(void) { flush(); }
