#pragma once
// kvheads: MHA, GQA and MQA as one attention kernel family. This umbrella header is the
// whole public API, except safetensors.hpp, which needs nlohmann/json: include that one by
// name.
#include "kvheads/attend.hpp"
#include "kvheads/attention.hpp"
#include "kvheads/convert.hpp"
#include "kvheads/core/reference.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/options.hpp"
#include "kvheads/tensor_view.hpp"
