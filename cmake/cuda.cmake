# The CUDA backend. sm_90a is the tuned Hopper target; sm_80 machine code keeps
# Ampere and Ada (sm_86, sm_89 run sm_80 code) working with no Hopper-only
# instruction. Override with -DCMAKE_CUDA_ARCHITECTURES=... for a faster build.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90a-real")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set_target_properties(tiny_kernel PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)  # CMake 3.25 knows no CUDA20 for nvcc
# tiny_kernel exists before the default above is set, so it does not inherit it.
set_target_properties(tiny_kernel PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")

file(GLOB TK_CUDA_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/*.cu)
target_sources(tiny_kernel PRIVATE ${TK_CUDA_SOURCES})
target_compile_definitions(tiny_kernel PRIVATE TK_HAVE_CUDA=1)
# Kernels with Hopper-only instructions (wgmma, setmaxnreg) exist only in an
# sm_90a build; host code dispatches to them only then.
if("${CMAKE_CUDA_ARCHITECTURES}" MATCHES "90a")
  target_compile_definitions(tiny_kernel PRIVATE TK_CUDA_SM90A=1)
endif()
target_compile_options(tiny_kernel PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -Xptxas=-warn-spills>)
target_link_libraries(tiny_kernel PRIVATE CUDA::cudart_static CUDA::cublasLt)
