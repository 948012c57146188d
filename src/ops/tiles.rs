//! Tile shapes of the tensor-core kernels, mirroring `TileConfig` in
//! kernels/include/lk_tile_gemm.cuh. If the two ever disagree on the shared
//! memory a launch needs, the host runtime's guard after dynamic shared
//! memory fails the launch (tests run every kernel through it).
pub(crate) struct MmaTiles {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub threads: u32,
    pub stages: usize,
}

pub(crate) const DECODE: MmaTiles = MmaTiles {
    bm: 16,
    bn: 32,
    bk: 64,
    // 2 warps per k slice, 2 k slices (`KSPLIT` in the kernels).
    threads: 128,
    stages: 6,
};
/// The decode tiles for `16 < m` (`DecodeWideTiles`) of the fused forward,
/// the multi-adapter forward and the backward's `dx`: one block covers up to
/// 64 rows, so `w` (and in the fused kernel `a`) is read once per column
/// tile; in the multi-adapter forward and `dx` each warp expands its own 16.
pub(crate) const DECODE_WIDE: MmaTiles = MmaTiles {
    bm: 64,
    bn: 32,
    bk: 64,
    threads: 128,
    stages: 5,
};

/// [`DECODE`] with a deeper pipeline (`DecodeDeepTiles`): 11 stages of `w`
/// in flight instead of 5, for GPUs whose blocks may take the shared memory.
pub(crate) const DECODE_DEEP: MmaTiles = MmaTiles {
    stages: 12,
    ..DECODE
};
/// [`DECODE_WIDE`] with a deeper pipeline (`DecodeWideDeepTiles`).
pub(crate) const DECODE_WIDE_DEEP: MmaTiles = MmaTiles {
    stages: 9,
    ..DECODE_WIDE
};

/// 16-row decode tiles whose blocks load `w` straight into the MMAs'
/// registers (`DecodeDirectTiles` in kernels/include/lk_direct_decode.cuh):
/// 2 warps across the columns times 4 k slices. The loop takes no shared
/// memory; the 3 stages size what the k slices' sums and the expand reuse.
pub(crate) const DECODE_DIRECT: MmaTiles = MmaTiles {
    threads: 256,
    stages: 3,
    ..DECODE
};

/// Blocks of the direct-load decode tiles split-K aims for per SM (two fit:
/// 128 registers a thread, 20 KiB of shared memory). Their partial sums
/// are less than the largest tile's the workspace holds one per SM of
/// (split_k_counters_at), and their tiles then number fewer than the SMs,
/// as the counters need.
pub(crate) const DIRECT_BLOCKS_PER_SM: usize = 2;

/// The fused forward's decode tiles for `m` rows: 16-row tiles up to 16,
/// with the deeper pipeline if `deep`.
pub(crate) fn fused_decode_tiles(m: usize, deep: bool) -> &'static MmaTiles {
    match (m <= DECODE.bm, deep) {
        (true, false) => &DECODE,
        (true, true) => &DECODE_DEEP,
        (false, false) => &DECODE_WIDE,
        (false, true) => &DECODE_WIDE_DEEP,
    }
}

/// Static shared memory the tensor-core kernels keep beside their dynamic
/// shared memory, at most (ptxas: 96 bytes for the 16-row decode tiles, 288
/// for the 64-row ones): a launch's choice of pipeline counts it.
pub(crate) const STATIC_SMEM_MARGIN: usize = 512;

/// Prefill of the multi-adapter forward and the backward's `dx`
/// (`PrefillTiles`): 4 warps of 64 x 64, two blocks per SM (the kernels'
/// header says why).
pub(crate) const PREFILL: MmaTiles = MmaTiles {
    bm: 128,
    bn: 128,
    bk: 32,
    threads: 128,
    stages: 3,
};

/// The fused forward's prefill (`FusedPrefillTiles`): 8 warps of 64 x 64, so
/// that its shrink's `t` tiles spread over 4 warps per block row.
pub(crate) const FUSED_PREFILL: MmaTiles = MmaTiles {
    bn: 256,
    threads: 256,
    ..PREFILL
};

/// Column tiles a fused prefill block takes side by side (`col_tiles` in
/// kernels/fused_forward_mma.cu): the first computes the shrink `t = x a^T`
/// and the others reuse it (ranks up to [`RANK_CHUNK`]), so the shrink's MMAs
/// and its loads of `a` are spent once per block. One 256-wide tile already
/// spends them once per 256 columns, as two 128-wide tiles did; 2 or more
/// would halve that again but halve the blocks, which a batch of a few
/// hundred tokens needs to fill the SMs (4 x 16 blocks at 512 tokens,
/// n = 4096): a value to settle by timing on a GPU (the tour's column-tile
/// table).
pub(crate) const PREFILL_COL_TILES: usize = 1;

/// The backward's reductions over tokens on tensor cores (`lk::tok` in
/// kernels/include/lk_token_gemm.cuh): a block of `threads` owns a
/// `ranks`-rank chunk times `bn` columns and walks its tokens `bk` at a time.
pub(crate) struct TokenGemmTiles {
    pub ranks: usize,
    pub bn: usize,
    pub bk: usize,
    pub threads: u32,
    pub stages: usize,
}

pub(crate) const TOKEN_GEMM: TokenGemmTiles = TokenGemmTiles {
    ranks: 32,
    bn: 128,
    bk: 32,
    threads: 128,
    stages: 4,
};

impl TokenGemmTiles {
    /// Dynamic shared memory of a launch: the pipeline's tiles of the
    /// gathered operand, and two tiles of the f32 operand as three bf16
    /// parts (`SMEM_BYTES` in the kernel).
    pub fn smem_bytes(&self) -> u32 {
        let gathered = self.stages * self.bk * (self.bn + 8);
        let parts = 2 * 3 * self.ranks * (self.bk + 8);
        ((gathered + parts) * 2) as u32
    }
}

/// The backward's `u = s g b` on tensor cores (`lk::gather` in
/// kernels/include/lk_gather_gemm.cuh): a block of `threads` takes `bm`
/// tokens times `ranks` columns of `b`, the reduction over `n` `bk` at a time.
pub(crate) struct GatherGemmTiles {
    pub bm: usize,
    pub ranks: usize,
    pub bk: usize,
    pub threads: u32,
    pub stages: usize,
}

pub(crate) const GATHER_GEMM: GatherGemmTiles = GatherGemmTiles {
    bm: 32,
    ranks: 64,
    bk: 64,
    threads: 128,
    stages: 4,
};

impl GatherGemmTiles {
    /// Dynamic shared memory of a launch: the pipeline's stages of gathered
    /// `g` rows and `b` rows (`SMEM_BYTES` in the kernel).
    pub fn smem_bytes(&self) -> u32 {
        let stage = self.bm * (self.bk + 8) + self.bk * (self.ranks + 8);
        (self.stages * stage * 2) as u32
    }
}

/// The SIMT kernels' tile (`lk::simt::Tiles` in
/// kernels/include/lk_simt_tile.cuh): a block of `threads` owns a `bm x bn`
/// tile of `y`; their shared memory is all static.
pub(crate) struct SimtTiles {
    pub bm: usize,
    pub bn: usize,
    pub threads: u32,
}

pub(crate) const SIMT: SimtTiles = SimtTiles {
    bm: 32,
    bn: 64,
    threads: 256,
};

/// Rank handled per pass (`RC` in the kernels).
pub(crate) const RANK_CHUNK: usize = 64;

impl MmaTiles {
    /// Rows of `a` a pipeline stage carries when the shrink rides along with
    /// the base product at rank `r`: min(64, r rounded up to 16).
    pub fn shrink_rows(&self, r: usize) -> usize {
        r.div_ceil(16).min(RANK_CHUNK / 16) * 16
    }

    /// Dynamic shared memory of a launch (`smem_elems` in the kernels).
    pub fn smem_bytes(&self, shrink_rows: usize) -> u32 {
        let pipeline = self.stages * (self.bm + self.bn + shrink_rows) * (self.bk + 8);
        // hi, lo and class of v, and b.
        let expand = (3 * self.bm + self.bn) * (RANK_CHUNK + 8);
        (pipeline.max(expand) * 2) as u32
    }

    /// Dynamic shared memory of a k-major-B launch (`smem_elems_bt`): the
    /// backward's tensor-core dx.
    pub fn smem_bytes_bt(&self) -> u32 {
        let pipeline = self.stages * (self.bm * (self.bk + 8) + self.bk * (self.bn + 8));
        let expand = 3 * self.bm * (RANK_CHUNK + 8) + RANK_CHUNK * (self.bn + 8);
        (pipeline.max(expand) * 2) as u32
    }
}
