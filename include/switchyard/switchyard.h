// switchyard/switchyard.h: the whole public API.
#pragma once
#include "switchyard/balance.h"
#include "switchyard/baseline.h"
#include "switchyard/config.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"
#include "switchyard/version.h"
