// charnn.js: run a charnn model in the page, with no server round trip.
//
//   import * as charnn from "./charnn.js";
//   const m = await charnn.load("/models/demo/web");   // or "model.safetensors"
//   m.predict("the ", { topK: 5 });                    // [{char, prob}], most likely first
//   for await (const ch of m.generate({ prompt: "the ", length: 200, seed: 1 })) ...
//
// One dependency-free ES module (no build step). It reads charnn's web export: one
// file in the safetensors layout (8-byte header length, JSON header, float32 data;
// see the README), and computes what the server computes: the same Elman RNN,
// a_t = tanh(Waa a_{t-1} + Wax x_t + ba), p = softmax(Wya a_t + by), with the
// state kept in float32 like the server's, sums in float64 (so the last digits of
// a probability may differ from the server's float32 GEMMs, by ~1e-7).

/** The export format this module reads. */
export const FORMAT = "charnn-web";
export const FORMAT_VERSION = 1;

const NAMES = ["Wax", "Waa", "Wya", "ba", "by"];
const DENSE_STATES = 512; // predict() keeps the state after each of the last 512 characters
const STATE_STRIDE = 16; // and after every 16th before them: an edit anywhere re-steps < 16 + its tail
const FRAME_MS = 8; // generate() yields to the page after this much work

/** Every failure of this module: `code` says which, `details` carries the specifics. */
export class CharnnError extends Error {
  /**
   * @param {string} code "fetch_failed" | "bad_file" | "unsupported_version" | "unknown_characters" | "invalid"
   * @param {string} message
   * @param {any} [details]
   */
  constructor(code, message, details) {
    super(message);
    this.name = "CharnnError";
    this.code = code;
    this.details = details;
  }
}

/**
 * Fetch and parse a web export.
 * @param {string | URL | ArrayBuffer} source a URL (fetched with `options.fetch`) or the file's bytes
 * @param {{fetch?: typeof fetch, headers?: Record<string, string>, wasm?: boolean}} [options]
 *   `wasm: false` computes in plain JavaScript even where WebAssembly SIMD runs
 * @returns {Promise<Model>}
 */
export async function load(source, options = {}) {
  if (source instanceof ArrayBuffer) return fromBuffer(source, options);
  const get = options.fetch ?? globalThis.fetch;
  let response;
  try {
    response = await get(String(source), { headers: options.headers });
  } catch (e) {
    throw new CharnnError("fetch_failed", `could not fetch ${source}: ${e}`);
  }
  if (!response.ok) {
    let why = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body?.error?.message) why += `: ${body.error.message}`;
    } catch {
      // not a charnn error body
    }
    throw new CharnnError("fetch_failed", `could not fetch ${source}: ${why}`, { status: response.status });
  }
  return fromBuffer(await response.arrayBuffer(), options);
}

/**
 * Parse a web export already in memory.
 * @param {ArrayBuffer} buffer
 * @param {{wasm?: boolean}} [options]
 * @returns {Model}
 */
export function fromBuffer(buffer, options = {}) {
  const bad = (why) => new CharnnError("bad_file", `not a charnn web export: ${why}`);
  if (!(buffer instanceof ArrayBuffer) || buffer.byteLength < 8) throw bad("shorter than its 8-byte header length");
  const view = new DataView(buffer);
  const n = Number(view.getBigUint64(0, true));
  if (n > buffer.byteLength - 8 || n % 8 !== 0) throw bad("bad header length");
  let header;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(buffer, 8, n)));
  } catch (e) {
    throw bad(`header is not JSON (${e.message})`);
  }
  const meta = header?.__metadata__;
  if (!meta || meta.format !== FORMAT) throw bad(`format ${JSON.stringify(meta?.format)}, expected "${FORMAT}"`);
  if (meta.format_version !== String(FORMAT_VERSION)) {
    throw new CharnnError(
      "unsupported_version",
      `web export format version ${JSON.stringify(meta.format_version)}; this charnn.js reads version ${FORMAT_VERSION}`,
      { version: meta.format_version },
    );
  }
  let vocab;
  try {
    vocab = JSON.parse(meta.vocab);
  } catch {
    throw bad("vocab is not JSON");
  }
  if (!Array.isArray(vocab) || !vocab.length || vocab.some((c) => typeof c !== "string" || [...c].length !== 1)) {
    throw bad("vocab is not a list of single characters");
  }
  const nA = Number(meta.hidden_size);
  const nX = vocab.length;
  const shapes = { Wax: [nA, nX], Waa: [nA, nA], Wya: [nX, nA], ba: [nA, 1], by: [nX, 1] };
  const start = 8 + n;
  /** @type {Record<string, Float32Array>} */
  const t = {};
  for (const name of NAMES) {
    const entry = header[name];
    if (!entry || entry.dtype !== "F32") throw bad(`${name} missing or not F32`);
    const [b, e] = entry.data_offsets ?? [];
    const want = shapes[name];
    const shapeOk = Array.isArray(entry.shape) && entry.shape.length === 2 && entry.shape[0] === want[0] && entry.shape[1] === want[1];
    if (!shapeOk || !(Number.isInteger(b) && Number.isInteger(e)) || b % 4 || e - b !== 4 * want[0] * want[1] || start + e > buffer.byteLength) {
      throw bad(`${name}: shape ${JSON.stringify(entry.shape)} or offsets do not fit a ${want.join("x")} float32 array`);
    }
    t[name] = new Float32Array(buffer, start + b, (e - b) / 4);
  }
  return new Model(meta, vocab, t, options.wasm);
}


// ------------------------------------------------------------------ kernels
//
// The two matrix-vector products per character (Waa h and Wya h) are nearly all the
// work. Plain loops over Float32Array ran 75-150 us a step at H = 256 in Chromium
// here (docs/benchmarks.md): too slow for 20,000 generated characters a second. A
// WebAssembly SIMD product (f32x4 lanes, summed in float32 like the server's GEMM)
// runs ~4x faster, so when the browser validates it, the products run in a
// 200-byte module assembled below from its instruction list (no build step, no
// binary blob); otherwise, or with `load(url, {wasm: false})`, in plain loops.

const uleb = (n) => {
  const out = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
};
const sleb = (n) => {
  const out = [];
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && !(b & 0x40)) || (n === -1 && b & 0x40)) return [...out, b];
    out.push(b | 0x80);
  }
};
const vec = (items) => [...uleb(items.length), ...items.flat()];
const name = (s) => [...uleb(s.length), ...Array.from(s, (c) => c.charCodeAt(0))];
const section = (id, bytes) => [id, ...uleb(bytes.length), ...bytes];

/**
 * matvec(W, h, out, rows, cols): out[i] = sum_j W[i*cols + j] * h[j] (byte addresses;
 * cols a multiple of 4), four float32 lanes per instruction.
 */
function matvecModule() {
  const [W, H, OUT, ROWS, COLS, I, J, P, ACC] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const get = (i) => [0x20, i];
  const set = (i) => [0x21, i];
  const i32 = (v) => [0x41, ...sleb(v)];
  const simd = (op, ...imm) => [0xfd, ...uleb(op), ...imm];
  const [add, shl, geU, fAdd, fStore] = [0x6a, 0x74, 0x4f, 0x92, 0x38];
  const [block, loop, end, br, brIf] = [[0x02, 0x40], [0x03, 0x40], 0x0b, 0x0c, 0x0d];
  const [v128Load, v128Const, lane, f32x4Add, f32x4Mul] = [0x00, 0x0c, 0x1f, 0xe4, 0xe6];
  const body = [
    ...vec([[3, 0x7f], [1, 0x7b]]), // locals: i, j, p (i32); acc (v128)
    ...get(W), ...set(P),
    ...block, ...loop, // for (i = 0; i < rows; i++)
    ...get(I), ...get(ROWS), geU, brIf, 1,
    ...simd(v128Const, ...new Array(16).fill(0)), ...set(ACC),
    ...i32(0), ...set(J),
    ...block, ...loop, // for (j = 0; j < cols; j += 4) acc += W[p..p+4] * h[j..j+4]
    ...get(J), ...get(COLS), geU, brIf, 1,
    ...get(ACC),
    ...get(P), ...simd(v128Load, 2, 0),
    ...get(H), ...get(J), ...i32(2), shl, add, ...simd(v128Load, 2, 0),
    ...simd(f32x4Mul), ...simd(f32x4Add), ...set(ACC),
    ...get(P), ...i32(16), add, ...set(P),
    ...get(J), ...i32(4), add, ...set(J),
    br, 0, end, end,
    ...get(OUT), ...get(I), ...i32(2), shl, add, // out[i] = (a0 + a1) + (a2 + a3)
    ...get(ACC), ...simd(lane, 0), ...get(ACC), ...simd(lane, 1), fAdd,
    ...get(ACC), ...simd(lane, 2), ...get(ACC), ...simd(lane, 3), fAdd, fAdd,
    fStore, 2, 0,
    ...get(I), ...i32(1), add, ...set(I),
    br, 0, end, end,
    end,
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec([[0x60, 5, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0]])), // (i32 x5) -> ()
    ...section(3, vec([[0]])),
    ...section(5, vec([[0, 1]])), // one memory, 1 page to start
    ...section(7, vec([[...name("matvec"), 0, 0], [...name("mem"), 2, 0]])),
    ...section(10, vec([[...uleb(body.length), ...body]])),
  ]);
}

/** The products in plain loops, summed in float64. */
class JsKernels {
  engine = "js";

  constructor(Waa, Wya, nA, nX) {
    this.Waa = Waa;
    this.Wya = Wya;
    this.nA = nA;
    this.nX = nX;
  }

  /** out[r] = W[r, :] . h for r < rows */
  static product(W, h, out, rows, n) {
    for (let i = 0; i < rows; i++) {
      const r = i * n;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      let j = 0;
      for (; j + 3 < n; j += 4) {
        s0 += W[r + j] * h[j];
        s1 += W[r + j + 1] * h[j + 1];
        s2 += W[r + j + 2] * h[j + 2];
        s3 += W[r + j + 3] * h[j + 3];
      }
      for (; j < n; j++) s0 += W[r + j] * h[j];
      out[i] = s0 + s1 + (s2 + s3);
    }
    return out;
  }

  recur(h, z) {
    return JsKernels.product(this.Waa, h, z, this.nA, this.nA);
  }

  output(h, z) {
    return JsKernels.product(this.Wya, h, z, this.nX, this.nA);
  }
}

/** The products in WebAssembly SIMD, on copies of the weights padded to 4 columns. */
class WasmKernels {
  engine = "wasm-simd";

  constructor(Waa, Wya, nA, nX) {
    const exports = new WebAssembly.Instance(new WebAssembly.Module(matvecModule())).exports;
    this.matvec = exports.matvec;
    const cols = Math.ceil(nA / 4) * 4;
    const bytes = 4 * (cols * nA + cols * nX + cols + nA + nX);
    exports.mem.grow(Math.ceil(bytes / 65536));
    const f = new Float32Array(exports.mem.buffer);
    this.nA = nA;
    this.nX = nX;
    this.cols = cols;
    this.waa = 0;
    this.wya = this.waa + cols * nA;
    this.h = this.wya + cols * nX;
    this.z = this.h + cols;
    this.y = this.z + nA;
    for (let i = 0; i < nA; i++) f.set(Waa.subarray(i * nA, (i + 1) * nA), this.waa + i * cols);
    for (let k = 0; k < nX; k++) f.set(Wya.subarray(k * nA, (k + 1) * nA), this.wya + k * cols);
    this.f = f;
  }

  #product(W, h, out, rows, at) {
    this.f.set(h, this.h);
    this.matvec(4 * W, 4 * this.h, 4 * at, rows, this.cols);
    out.set(this.f.subarray(at, at + rows));
    return out;
  }

  recur(h, z) {
    return this.#product(this.waa, h, z, this.nA, this.z);
  }

  output(h, z) {
    return this.#product(this.wya, h, z, this.nX, this.y);
  }
}

function kernels(t, nA, nX, wasm) {
  if (wasm !== false && typeof WebAssembly === "object") {
    try {
      return new WasmKernels(t.Waa, t.Wya, nA, nX);
    } catch {
      // no SIMD, or a page policy without 'wasm-unsafe-eval': the plain loops
    }
  }
  return new JsKernels(t.Waa, t.Wya, nA, nX);
}

/** A loaded model: the vocabulary, the weights, a stateful cursor and a prefix cache. */
export class Model {
  /** @type {string[]} the characters, in index order */
  vocab;
  /** @type {number} */
  hiddenSize;
  /** @type {Record<string, string>} the export's metadata (model_id, name, ...) */
  meta;
  /** @type {"wasm-simd" | "js"} which kernels compute the products */
  engine;
  #index;
  #k; // the kernels: Waa h and Wya h
  #emb; // (nX, nA): Wax[:, x] + ba, one contiguous row per input character
  #by;
  #z; // Waa h, before the input and tanh
  #state; // feed()'s state
  #ids = []; // predict()'s last text, encoded
  #states = new Map(); // predict(): position -> state after that many characters
  #logits;
  #probs;

  /**
   * @param {Record<string,string>} meta @param {string[]} vocab @param {Record<string, Float32Array>} t
   * @param {boolean} [wasm] false: plain loops even where WebAssembly SIMD runs
   */
  constructor(meta, vocab, t, wasm) {
    this.meta = meta;
    this.vocab = vocab;
    this.hiddenSize = Number(meta.hidden_size);
    const nA = this.hiddenSize;
    const nX = vocab.length;
    this.#index = new Map(vocab.map((c, i) => [c, i]));
    this.#k = kernels(t, nA, nX, wasm);
    this.engine = this.#k.engine;
    this.#z = new Float32Array(nA);
    this.#by = t.by;
    this.#emb = new Float32Array(nX * nA);
    for (let x = 0; x < nX; x++) for (let i = 0; i < nA; i++) this.#emb[x * nA + i] = t.Wax[i * nX + x] + t.ba[i];
    this.#state = new Float32Array(nA);
    this.#states.set(0, new Float32Array(nA));
    this.#logits = new Float64Array(nX);
    this.#probs = new Float64Array(nX);
  }

  /** The state feed() has reached (a copy); assign one of hiddenSize numbers to restore it. */
  get state() {
    return this.#state.slice();
  }

  set state(value) {
    if (!value || value.length !== this.hiddenSize) {
      throw new CharnnError("invalid", `a state has ${this.hiddenSize} numbers, got ${value?.length}`);
    }
    this.#state = Float32Array.from(value);
  }

  /**
   * The indices of `text`'s characters.
   * @param {string} text
   * @returns {Int32Array}
   */
  encode(text) {
    const chars = Array.from(text);
    const ids = new Int32Array(chars.length);
    const unknown = [];
    chars.forEach((c, k) => {
      const i = this.#index.get(c);
      if (i === undefined) {
        if (!unknown.includes(c)) unknown.push(c);
      } else ids[k] = i;
    });
    if (unknown.length) {
      const named = unknown.slice(0, 20).map(quoted).join(", ");
      const more = unknown.length > 20 ? ` and ${unknown.length - 20} more` : "";
      throw new CharnnError("unknown_characters", `characters not in the model's vocabulary: ${named}${more}`, { chars: unknown });
    }
    return ids;
  }

  /** out = tanh(Waa h + Wax[:, x] + ba) */
  #step(h, x, out) {
    const n = this.hiddenSize;
    const z = this.#k.recur(h, this.#z);
    const emb = this.#emb;
    const e0 = x * n;
    for (let i = 0; i < n; i++) out[i] = Math.tanh(z[i] + emb[e0 + i]);
    return out;
  }

  /** this.#logits = Wya h + by, rounded to float32 as the server's are */
  #computeLogits(h) {
    const out = this.#k.output(h, this.#logits);
    const by = this.#by;
    for (let k = 0; k < out.length; k++) out[k] = Math.fround(out[k] + by[k]);
    return out;
  }

  /** softmax(logits / temperature) into this.#probs; temperature 0: one-hot on the argmax. */
  #softmax(logits, temperature) {
    const p = this.#probs;
    if (temperature === 0) {
      p.fill(0);
      p[argmax(logits)] = 1;
      return p;
    }
    let max = -Infinity;
    for (let k = 0; k < logits.length; k++) if (logits[k] > max) max = logits[k];
    let sum = 0;
    for (let k = 0; k < logits.length; k++) {
      const v = Math.exp((logits[k] - max) / temperature);
      p[k] = v;
      sum += v;
    }
    for (let k = 0; k < p.length; k++) p[k] /= sum;
    return p;
  }

  #ranked(probs, topK) {
    checkTopK(topK);
    const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
    const keep = topK === undefined || topK === null ? order : order.slice(0, topK);
    return keep.map((i) => ({ char: this.vocab[i], prob: probs[i] }));
  }

  /** The state after `ids`, from the longest prefix of them predict() has seen. */
  #stateAfter(ids) {
    const old = this.#ids;
    let same = 0;
    const n = Math.min(old.length, ids.length);
    while (same < n && old[same] === ids[same]) same++;
    let from = same;
    while (!this.#states.has(from)) from--;
    let h = this.#states.get(from);
    const len = ids.length;
    for (let k = from; k < len; k++) {
      h = this.#step(h, ids[k], new Float32Array(this.hiddenSize));
      const pos = k + 1;
      if (pos % STATE_STRIDE === 0 || pos > len - DENSE_STATES) this.#states.set(pos, h);
    }
    for (const pos of this.#states.keys()) {
      if (pos > len || (pos % STATE_STRIDE !== 0 && pos <= len - DENSE_STATES)) this.#states.delete(pos);
    }
    this.#ids = Array.from(ids);
    return h;
  }

  /**
   * The next-character distribution after `text` (from the empty text: stateless), most
   * likely first, summing to 1 over the vocabulary. Typing, backspace and edits reuse the
   * states of the previous call's text, so each costs only the characters that changed.
   * @param {string} text
   * @param {{topK?: number, temperature?: number}} [options]
   * @returns {{char: string, prob: number}[]}
   */
  predict(text, { topK, temperature = 1 } = {}) {
    checkTemperature(temperature);
    const h = this.#stateAfter(this.encode(text));
    return this.#ranked(this.#softmax(this.#computeLogits(h), temperature), topK);
  }

  /**
   * Step feed()'s state through `text` and return the distribution after it.
   * @param {string} text
   * @param {{topK?: number, temperature?: number}} [options]
   * @returns {{char: string, prob: number}[]}
   */
  feed(text, { topK, temperature = 1 } = {}) {
    checkTemperature(temperature);
    const ids = this.encode(text);
    let h = this.#state;
    let other = new Float32Array(this.hiddenSize);
    for (const x of ids) {
      const next = this.#step(h, x, other);
      other = h;
      h = next;
    }
    this.#state = h;
    return this.#ranked(this.#softmax(this.#computeLogits(h), temperature), topK);
  }

  /** feed()'s state back to the start (the empty text). */
  reset() {
    this.#state = new Float32Array(this.hiddenSize);
  }

  /**
   * Natural-log probability of each character of `text`, the first given the empty text.
   * @param {string} text
   * @returns {{chars: number, logprobs: number[], meanNats: number, bitsPerChar: number, perplexity: number}}
   */
  score(text) {
    const ids = this.encode(text);
    if (!ids.length) throw new CharnnError("invalid", "score needs at least one character");
    let h = new Float32Array(this.hiddenSize);
    let other = new Float32Array(this.hiddenSize);
    const logprobs = new Array(ids.length);
    let total = 0;
    for (let k = 0; k < ids.length; k++) {
      const z = this.#computeLogits(h);
      let max = -Infinity;
      for (let i = 0; i < z.length; i++) if (z[i] > max) max = z[i];
      let sum = 0;
      for (let i = 0; i < z.length; i++) sum += Math.exp(z[i] - max);
      const lp = z[ids[k]] - max - Math.log(sum);
      logprobs[k] = lp;
      total += lp;
      if (k + 1 < ids.length) {
        const next = this.#step(h, ids[k], other);
        other = h;
        h = next;
      }
    }
    const meanNats = -total / ids.length;
    return { chars: ids.length, logprobs, meanNats, bitsPerChar: meanNats / Math.LN2, perplexity: Math.exp(meanNats) };
  }

  /**
   * Sample text after `prompt`, a character at a time: an async iterator of the released
   * characters (a stop string is never released). It yields to the page every few
   * milliseconds, so the page stays responsive however long the sample. The same seed
   * gives the same text in every browser (not the server's text: its generator differs);
   * temperature 0 is greedy and equals the server's.
   * @param {{prompt?: string, length?: number, temperature?: number, topK?: number, topP?: number,
   *          seed?: number | bigint, stop?: string | string[], onChar?: (ch: string) => void,
   *          signal?: AbortSignal}} [options]
   * @returns {AsyncGenerator<string, "length" | "stop", void>} its return value is the finish reason
   */
  async *generate(options = {}) {
    const { prompt = "", length = 200, temperature = 1, topK, topP, seed, onChar, signal } = options;
    checkTemperature(temperature);
    checkTopK(topK);
    if (topP !== undefined && topP !== null && !(topP > 0 && topP <= 1)) throw new CharnnError("invalid", `topP must be in (0, 1], got ${topP}`);
    if (!(Number.isInteger(length) && length >= 0)) throw new CharnnError("invalid", `length must be an integer >= 0, got ${length}`);
    const stops = options.stop === undefined ? [] : typeof options.stop === "string" ? [options.stop] : [...options.stop];
    if (stops.some((s) => typeof s !== "string" || s === "")) throw new CharnnError("invalid", "stop strings must be non-empty strings");
    const longest = Math.max(0, ...stops.map((s) => Array.from(s).length));
    const random = rng(seed);
    let h = this.#stateAfter(this.encode(prompt)).slice();
    let other = new Float32Array(this.hiddenSize);
    let pending = [];
    let last = performance.now();
    const release = function* (chars) {
      for (const ch of chars) {
        if (onChar) onChar(ch);
        yield ch;
      }
    };
    for (let chosen = 0; chosen < length; ) {
      if (signal?.aborted) throw signal.reason ?? new DOMException("aborted", "AbortError");
      const z = this.#computeLogits(h);
      let i;
      if (temperature === 0) i = argmax(z);
      else i = draw(truncate(this.#softmax(z, temperature), topK, topP), random());
      chosen++;
      let out = [this.vocab[i]];
      if (stops.length) {
        pending.push(this.vocab[i]);
        const text = pending.join("");
        const hit = stops.filter((s) => text.endsWith(s));
        if (hit.length) {
          const cut = Math.max(...hit.map((s) => Array.from(s).length));
          yield* release(pending.slice(0, pending.length - cut));
          return "stop";
        }
        const k = heldSuffix(pending, stops, longest);
        out = pending.slice(0, pending.length - k);
        pending = pending.slice(pending.length - k);
      }
      if (chosen >= length) {
        yield* release(out.concat(pending));
        return "length";
      }
      yield* release(out);
      const next = this.#step(h, i, other);
      other = h;
      h = next;
      if (performance.now() - last > FRAME_MS) {
        await nextTask();
        last = performance.now();
      }
    }
    return "length";
  }

  /**
   * generate() collected: the whole sample as one string.
   * @param {Parameters<Model["generate"]>[0]} [options]
   * @returns {Promise<string>}
   */
  async generateText(options = {}) {
    let text = "";
    for await (const ch of this.generate(options)) text += ch;
    return text;
  }
}

/**
 * Shannon entropy in bits of a distribution as predict() returns it (all of it: no topK).
 * @param {{prob: number}[]} next
 */
export function entropyBits(next) {
  let h = 0;
  for (const { prob } of next) if (prob > 0) h -= prob * Math.log2(prob);
  return h;
}

/** A character as the server names it (Python's repr): 'x', '\\n', "'". */
function quoted(c) {
  const escapes = { "\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\" };
  const body = escapes[c] ?? (c.codePointAt(0) < 0x20 || c.codePointAt(0) === 0x7f ? `\\x${c.codePointAt(0).toString(16).padStart(2, "0")}` : c);
  return c === "'" ? `"'"` : `'${body}'`;
}

function checkTemperature(t) {
  if (!(typeof t === "number" && t >= 0 && Number.isFinite(t))) throw new CharnnError("invalid", `temperature must be a finite number >= 0, got ${t}`);
}

function checkTopK(k) {
  if (k !== undefined && k !== null && !(Number.isInteger(k) && k >= 1)) throw new CharnnError("invalid", `topK must be an integer >= 1, got ${k}`);
}

function argmax(v) {
  let best = 0;
  for (let k = 1; k < v.length; k++) if (v[k] > v[best]) best = k;
  return best;
}

/** Zero all but the top-k / nucleus of `p` (in place) and renormalise, as the server does. */
function truncate(p, topK, topP) {
  const noK = topK === undefined || topK === null;
  const noP = topP === undefined || topP === null;
  if (noK && noP) return p;
  const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);
  let keep = p.length;
  if (!noK) keep = Math.min(keep, topK);
  if (!noP) {
    let cum = 0;
    let n = 0;
    while (n < order.length) {
      cum += p[order[n]];
      n++;
      if (cum >= topP) break;
    }
    keep = Math.min(keep, n);
  }
  for (let r = keep; r < order.length; r++) p[order[r]] = 0;
  let sum = 0;
  for (let k = 0; k < p.length; k++) sum += p[k];
  for (let k = 0; k < p.length; k++) p[k] /= sum;
  return p;
}

/** Inverse-CDF draw with u in [0, 1); never a zero-probability entry. */
function draw(p, u) {
  let total = 0;
  for (let k = 0; k < p.length; k++) total += p[k];
  const target = u * total;
  let cum = 0;
  let lastNonZero = 0;
  for (let k = 0; k < p.length; k++) {
    if (p[k] > 0) lastNonZero = k;
    cum += p[k];
    if (cum > target && p[k] > 0) return k;
  }
  return lastNonZero;
}

/** How many of the last pending characters begin some stop string (held back). */
function heldSuffix(pending, stops, longest) {
  for (let k = Math.min(pending.length, longest - 1); k > 0; k--) {
    const tail = pending.slice(pending.length - k).join("");
    if (stops.some((s) => s.startsWith(tail))) return k;
  }
  return 0;
}

/**
 * A seeded uniform generator on [0, 1) (xoshiro128**, seeded by splitmix32); no seed: Math.random.
 * @param {number | bigint | undefined | null} seed
 * @returns {() => number}
 */
function rng(seed) {
  if (seed === undefined || seed === null) return Math.random;
  let big;
  try {
    big = BigInt(seed);
  } catch {
    throw new CharnnError("invalid", `seed must be an integer >= 0, got ${seed}`);
  }
  if (big < 0n || big >= 2n ** 64n) throw new CharnnError("invalid", `seed must be an integer in [0, 2^64), got ${seed}`);
  let x = Number(big & 0xffffffffn) ^ Number((big >> 32n) & 0xffffffffn) ^ 0x9e3779b9;
  const split = () => {
    x = (x + 0x9e3779b9) | 0;
    let z = x;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = split(), b = split(), c = split(), d = split();
  const next = () => {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0;
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    return r;
  };
  return () => (next() * 2 ** 21 + (next() >>> 11)) / 2 ** 53;
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

/**
 * Let the page run before going on: a new task, not a microtask. A MessageChannel task
 * queues behind what is already waiting (timers, network callbacks, input), where
 * scheduler.yield() would jump ahead of other tasks.
 */
function nextTask() {
  if (typeof MessageChannel === "undefined") return new Promise((resolve) => setTimeout(resolve, 0));
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => {
      channel.port1.close();
      resolve();
    };
    channel.port2.postMessage(null);
  });
}
