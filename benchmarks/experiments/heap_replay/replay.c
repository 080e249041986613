/* Replays a trace of recorder.c against this process's glibc heap, for heap_replay.py.
 *
 *   replay TRACE [ACTIONS] [PLACED]
 *
 * Every recorded call is made again, in order, with the recorded sizes (calloc as
 * calloc, aligned blocks as memalign), and every block is written in full, as the
 * tensors it stood for were. Between markers 1 and 2 (the training steps) the peak
 * resident set is read as the workers read it (VmHWM after a reset through
 * /proc/self/clear_refs, over VmRSS at the reset), and so is the heap at its highest
 * point (its size, and the free space inside it, mallinfo2). ACTIONS, where given, is
 * one byte per record: 0 as recorded, 1 the block gets a mapping of its own (as a block
 * over glibc's mmap threshold would), 2 the block is left out. PLACED, where given,
 * receives each record's block address in this process, for heap_replay.py to check
 * that the replay placed every block where the recorded process did.
 *
 * The replay allocates nothing on the heap besides the recorded blocks: the trace,
 * the block table and the output go into mappings of their own.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct { uint64_t op, a, b, c; } record_t;

static void *mapping(size_t n) {
  void *p = mmap(0, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { perror("replay: mmap"); exit(2); }
  return p;
}

static void *read_file(const char *path, size_t *bytes) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) { perror(path); exit(2); }
  *bytes = lseek(fd, 0, SEEK_END);
  lseek(fd, 0, SEEK_SET);
  char *p = mapping(*bytes);
  size_t got = 0;
  while (got < *bytes) {
    ssize_t n = read(fd, p + got, *bytes - got);
    if (n <= 0) { perror(path); exit(2); }
    got += n;
  }
  close(fd);
  return p;
}

/* recorded block address -> (address here, how it was made) */
enum { HEAP = 0, OWN = 1, LEFT_OUT = 2 };
static uint64_t *keys, mask;
static void **values;
static uint64_t *sizes;
static unsigned char *kinds;
static uint64_t slot_of(uint64_t k) {
  uint64_t h = k ^ (k >> 33);
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h & mask;
}
static void put(uint64_t k, void *v, uint64_t size, unsigned char kind) {
  uint64_t i = slot_of(k);
  while (keys[i] && keys[i] != k && keys[i] != 1) i = (i + 1) & mask;
  keys[i] = k; values[i] = v; sizes[i] = size; kinds[i] = kind;
}
static long find(uint64_t k) {
  uint64_t i = slot_of(k);
  while (keys[i]) {
    if (keys[i] == k) return (long)i;
    i = (i + 1) & mask;
  }
  return -1;
}

static char status_text[16384];
static long status_kib(const char *field) {
  int fd = open("/proc/self/status", O_RDONLY);
  ssize_t n = read(fd, status_text, sizeof status_text - 1);
  close(fd);
  status_text[n > 0 ? n : 0] = 0;
  size_t len = strlen(field);
  for (char *p = status_text; (p = strstr(p, field)); p += len)
    if ((p == status_text || p[-1] == '\n') && p[len] == ':') return atol(p + len + 1);
  return -1;
}

static void release(long i) {
  if (kinds[i] == OWN) munmap(values[i], sizes[i]);
  else if (kinds[i] == HEAP) free(values[i]);
  keys[i] = 1;   /* a tombstone */
}

int main(int argc, char **argv) {
  static char out[1 << 16];
  setvbuf(stdout, out, _IOFBF, sizeof out);
  if (argc < 2) { fprintf(stderr, "usage: replay TRACE [ACTIONS|-] [PLACED]\n"); return 2; }
  size_t bytes, action_bytes = 0;
  record_t *trace = read_file(argv[1], &bytes);
  const long n = bytes / sizeof(record_t);
  unsigned char *actions = NULL;
  if (argc > 2 && strcmp(argv[2], "-")) {
    actions = read_file(argv[2], &action_bytes);
    if ((long)action_bytes != n) { fprintf(stderr, "replay: %s holds %zu actions for %ld records\n", argv[2], action_bytes, n); return 2; }
  }
  uint64_t *placed = argc > 3 ? mapping(n * sizeof(uint64_t)) : NULL;
  uint64_t capacity = 1;
  while (capacity < 4 * (uint64_t)n) capacity <<= 1;
  mask = capacity - 1;
  keys = mapping(capacity * 8); values = mapping(capacity * 8);
  sizes = mapping(capacity * 8); kinds = mapping(capacity);

  long before = 0, steps_start = -1;
  uintptr_t top = 0;
  struct mallinfo2 at_top = {0}, at_end = {0};
  long peak_kib = -1;
  int in_steps = 0;
  for (long i = 0; i < n; ++i) {
    const record_t *r = &trace[i];
    const uint64_t op = r->op & 255;
    void *p = NULL;
    long j;
    switch (op) {
      case 1: case 3: case 5: {
        unsigned char kind = actions && in_steps ? actions[i] : HEAP;
        if (kind == LEFT_OUT) { put(r->a, NULL, r->b, LEFT_OUT); break; }
        if (kind == OWN) p = mapping(r->b);
        else if (op == 5) p = memalign(r->c, r->b);
        else if (op == 3) p = calloc(1, r->b);
        else p = malloc(r->b);
        if (r->b) memset(p, 1, r->b);
        put(r->a, p, r->b, kind);
        if (placed) placed[i] = (uint64_t)p;
        if (in_steps && kind == HEAP) {
          uintptr_t t = (uintptr_t)sbrk(0);
          if (t > top) { top = t; at_top = mallinfo2(); }
        }
        break;
      }
      case 2:
        j = find(r->a);
        if (j >= 0) release(j);
        break;
      case 4: {
        j = r->a ? find(r->a) : -1;
        void *old = NULL;
        if (j >= 0) {
          if (kinds[j] != HEAP) { fprintf(stderr, "replay: record %ld reallocates a block the actions moved off the heap\n", i); return 2; }
          old = values[j];
          keys[j] = 1;
        }
        p = realloc(old, r->b);
        if (r->b && p) memset(p, 1, r->b);
        if (r->c) put(r->c, p, r->b, HEAP);
        if (placed) placed[i] = (uint64_t)p;
        break;
      }
      case 6:
        if (r->b == 99) malloc_trim(0);
        if (r->b == 1) {
          int fd = open("/proc/self/clear_refs", O_WRONLY);
          if (fd < 0 || write(fd, "5", 1) != 1) { perror("replay: /proc/self/clear_refs"); return 2; }
          close(fd);
          before = status_kib("VmRSS");
          in_steps = 1; steps_start = i; top = 0;
        }
        if (r->b == 2) {
          peak_kib = status_kib("VmHWM");
          at_end = mallinfo2();
          in_steps = 0;
        }
        break;
    }
  }
  if (steps_start < 0 || peak_kib < 0) { fprintf(stderr, "replay: %s has no steps (markers 1 and 2)\n", argv[1]); return 2; }
  const double mib = 1024.0 * 1024.0;
  printf("{\"peak_mib\": %.2f, \"heap_top_mib\": %.2f, \"free_at_top_mib\": %.2f, "
         "\"heap_end_mib\": %.2f, \"free_end_mib\": %.2f}\n",
         (peak_kib - before) / 1024.0, at_top.arena / mib, at_top.fordblks / mib,
         at_end.arena / mib, at_end.fordblks / mib);
  fflush(stdout);
  if (placed) {
    int fd = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const char *q = (const char *)placed;
    size_t left = n * sizeof(uint64_t);
    while (left) { ssize_t w = write(fd, q, left); if (w <= 0) { perror(argv[3]); return 2; } q += w; left -= w; }
    close(fd);
  }
  return 0;
}
